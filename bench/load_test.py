"""Benchmark: concurrent gradio_client users on the app's three API endpoints, against an app this script launches.

    cd /work/main && flock /tmp/sdtune-cpu.lock env HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/load_test.py

It writes two tiny models that differ only in their UNet (tinyworld.factories's pipeline and a perturbed copy), starts
`python gradio_app.py --models FILE --port P --output_dir DIR --device cpu` on loopback in a subprocess, and runs
--users users at once, each with its own Client (its own session) making --requests requests in turn, cycling through
/text2img, /img2img and /random_batch. Every request sends its own prompt, seed, model and step count; the check reads
the `parameters` chunk of every PNG that comes back and requires the request's own values in it (and, for the batch,
the model and seed that sdtune.seeds draws for each uploaded file name).

Latency is the wall time of one request from the client's side: submit to result, including the wait in the app's
queue (generation runs one request at a time on the device) and the file transfers. "service s" is the app's own
time for the request, from the run record it returns. The run is bounded: --users x --requests requests, and every
request still unfinished at --time_limit seconds is counted as failed. Exit status 1 if any request failed.

`--backend ray --replicas N` starts the app with `--backend ray --replicas N --replica_cpus 1`: N Ray Serve replicas
of one CPU (one torch thread) each on a local Ray cluster, and N generating requests at once (bench/SERVING.md).
"""

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing may be downloaded

import numpy as np  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from PIL import Image  # noqa: E402
from serve_batch import write_unet_variant  # noqa: E402  (bench/ is the script's folder, so on sys.path)

from sdtune.generation.core import working_size  # noqa: E402
from sdtune.generation.pnginfo import parse_parameters, read_parameters  # noqa: E402
from sdtune.seeds import draw_model, image_seed  # noqa: E402
from tinyworld.factories import TINY_RESOLUTION, write_tiny_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENDPOINTS = ("/text2img", "/img2img", "/random_batch")
MODELS = ("stock", "tuned")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
UPLOAD_SIZE = (80, 48)  # not the model's size, so img2img's resize to the working size and back is exercised


@dataclass
class Result:
    endpoint: str
    user: int
    index: int
    seconds: float = 0.0  # client-side latency
    service_seconds: float = 0.0  # the app's own run time, from the run record
    error: str = ""


class Deadline:
    """The time left for the whole run."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()


def parse_bench_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=4, help="Concurrent gradio_client users.")
    parser.add_argument("--requests", type=int, default=3, help="Requests per user, one after another.")
    parser.add_argument("--time_limit", type=float, default=600, help="Seconds for all requests together.")
    parser.add_argument("--num_inference_steps", type=int, default=20,
                        help="Steps of the first request; the others add 0-2 so each request's value is its own.")
    parser.add_argument("--batch_images", type=int, default=3, help="Uploads per /random_batch request.")
    parser.add_argument("--startup_timeout", type=float, default=180, help="Seconds to wait for the app to serve.")
    parser.add_argument("--keep", default=None, help="Write models, inputs, outputs and the app's log here.")
    parser.add_argument("--backend", default="local", choices=["local", "ray"],
                        help="The app's --backend: ray runs --replicas Ray Serve replicas of one CPU (one thread) "
                             "each.")
    parser.add_argument("--replicas", type=int, default=1, help="With --backend ray: the app's --replicas.")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_models(root: Path) -> Path:
    """Two tiny models differing only in their UNet, and the models YAML that lists them."""
    stock = write_tiny_pipeline(root / "models" / "stock", seed=0)
    tuned = write_unet_variant(stock, root / "models" / "tuned")
    listing = root / "models.yaml"
    listing.write_text(f"models:\n  - name: stock\n    path: {stock}\n  - name: tuned\n    path: {tuned}\n")
    return listing


def launch_app(listing: Path, root: Path, port: int, timeout: float, backend: list[str]) -> subprocess.Popen:
    """Start gradio_app.py (with the `backend` flags) in its own process and wait until it answers on loopback."""
    (root / "allowed").mkdir(exist_ok=True)
    command = [sys.executable, "gradio_app.py", "--models", str(listing), "--port", str(port), "--host", "127.0.0.1",
               "--output_dir", str(root / "app-outputs"), "--allowed-root", str(root / "allowed"), "--device", "cpu",
               *backend]
    # the app's upload cache goes under root too, not into the shared /tmp/gradio
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_TEMP_DIR=str(root / "gradio-cache"))
    with open(root / "app.log", "w") as log:  # the app writes to its own copy of the descriptor
        app = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise SystemExit(f"gradio_app.py exited with {app.returncode}:\n{(root / 'app.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return app
        except OSError:
            time.sleep(0.5)
    stop_app(app)
    raise SystemExit(f"gradio_app.py did not answer within {timeout:.0f} s; see {root / 'app.log'}")


def stop_app(app: subprocess.Popen) -> None:
    """End the app process this script started."""
    app.terminate()
    try:
        app.wait(timeout=20)
    except subprocess.TimeoutExpired:
        app.kill()
        app.wait()


def expect(parameters: dict, **wanted) -> None:
    """Raise if a PNG's parameters differ from what its request sent."""
    wrong = {key: (parameters.get(key), str(value)) for key, value in wanted.items()
             if parameters.get(key) != str(value)}
    if wrong:
        raise AssertionError(f"parameters (got, sent): {wrong}")


def request_values(user: int, index: int, bench) -> dict:
    """What request (user, index) sends: each value unique to it or varying between requests."""
    number = user * 100 + index
    return {"prompt": f"user {user} request {index} a red circle", "seed": 1000 + number,
            "model": MODELS[(user + index) % 2], "steps": bench.num_inference_steps + (user + index) % 3,
            "batch_images": bench.batch_images}


def text2img(client: Client, sent: dict, folder: Path, deadline: Deadline) -> float:
    """Two images; checks the seed returned and each PNG's parameters. Returns the app's own seconds."""
    gallery, seed, run = call(client, deadline, "/text2img", prompt=sent["prompt"], negative_prompt="",
                              model=sent["model"], scheduler="dpmsolver++", num_inference_steps=sent["steps"],
                              guidance_scale=7.5, width=TINY_RESOLUTION, height=TINY_RESOLUTION, seed=sent["seed"],
                              num_images=2)
    if seed != sent["seed"] or len(gallery) != 2:
        raise AssertionError(f"seed {seed} for {sent['seed']}, {len(gallery)} images for 2")
    for offset, item in enumerate(gallery):
        expect(parse_parameters(read_parameters(item["image"])), prompt=sent["prompt"], Seed=sent["seed"] + offset,
               Model=sent["model"], Steps=sent["steps"], Size=f"{TINY_RESOLUTION}x{TINY_RESOLUTION}")
    return run["total_seconds"]


def img2img(client: Client, sent: dict, folder: Path, deadline: Deadline) -> float:
    """One upload; checks the result's size and parameters. Returns the app's own seconds."""
    upload = folder / f"{sent['seed']}.png"
    Image.new("RGB", UPLOAD_SIZE, COLOURS[sent["seed"] % len(COLOURS)]).save(upload)
    path, seed, run = call(client, deadline, "/img2img", image=handle_file(upload), prompt=sent["prompt"],
                           negative_prompt="", model=sent["model"], scheduler="dpmsolver++",
                           num_inference_steps=sent["steps"], guidance_scale=7.5, strength=0.6, seed=sent["seed"],
                           resolution=0)
    if Image.open(path).size != UPLOAD_SIZE:
        raise AssertionError(f"result is {Image.open(path).size}, the upload {UPLOAD_SIZE}")
    width, height = working_size(UPLOAD_SIZE, TINY_RESOLUTION)
    expect(parse_parameters(read_parameters(path)), prompt=sent["prompt"], Seed=sent["seed"], Model=sent["model"],
           Steps=sent["steps"], Size=f"{width}x{height}", **{"Denoising strength": 0.6})
    return run["total_seconds"]


def random_batch(client: Client, sent: dict, folder: Path, deadline: Deadline) -> float:
    """Uploads named for this request; checks every row and each output's drawn model and seed. Returns the app's
    own seconds."""
    count = sent["batch_images"]
    names = [f"r{sent['seed']}_{k}_{COLOURS[k % len(COLOURS)]}_circle.png" for k in range(count)]
    for k, name in enumerate(names):
        Image.new("RGB", UPLOAD_SIZE, COLOURS[k % len(COLOURS)]).save(folder / name)
    gallery, table, archive, run = call(
        client, deadline, "/random_batch", images=[handle_file(folder / n) for n in names], folder="",
        models=list(MODELS), prompt=sent["prompt"], seed=sent["seed"], strength=0.6,
        num_inference_steps=sent["steps"], guidance_scale=7.5, scheduler="dpmsolver++", resolution=0)
    rows = {row[0]: row for row in table["data"]}
    if sorted(rows) != sorted(names) or any(row[5] for row in rows.values()) or len(gallery) != count:
        raise AssertionError(f"batch rows {table['data']} for uploads {names}")
    by_model_seed = {(row[1], str(row[3])): name for name, row in rows.items()}
    for item in gallery:
        parameters = parse_parameters(read_parameters(item["image"]))
        name = by_model_seed.get((parameters.get("Model"), parameters.get("Seed")))
        if name is None:
            raise AssertionError(f"an output that no row of this request made: {parameters}")
        expect(parameters, prompt=sent["prompt"], Steps=sent["steps"], Model=draw_model(sent["seed"], name, MODELS),
               Seed=image_seed(sent["seed"], name))
    return run["total_seconds"]


def call(client: Client, deadline: Deadline, endpoint: str, **inputs):
    """One API call that gives up when the run's time limit is reached."""
    return client.submit(**inputs, api_name=endpoint).result(timeout=max(1.0, deadline.remaining()))


CHECKED_CALLS = {"/text2img": text2img, "/img2img": img2img, "/random_batch": random_batch}


def user_session(url: str, user: int, bench, folder: Path, deadline: Deadline, results: list[Result]) -> None:
    """One user: a Client of their own and --requests requests in turn, each checked."""
    planned = [Result(ENDPOINTS[(user + index) % len(ENDPOINTS)], user, index) for index in range(bench.requests)]
    results.extend(planned)
    try:
        client = Client(url, verbose=False, download_files=str(folder / "downloads"), analytics_enabled=False)
    except Exception as error:  # no session, no requests: each counts as failed
        for result in planned:
            result.error = f"no client: {type(error).__name__}: {error}"
        return
    for result in planned:
        if deadline.remaining() <= 0:
            result.error = "not started: time limit reached"
            continue
        sent = request_values(user, result.index, bench)
        start = time.perf_counter()
        try:
            result.service_seconds = CHECKED_CALLS[result.endpoint](client, sent, folder, deadline)
        except Exception as error:  # a failed request is the finding: record it, the other users go on
            result.error = f"{type(error).__name__}: {error}"
        result.seconds = time.perf_counter() - start


def print_table(results: list[Result]) -> None:
    """Latency percentiles per endpoint (linear interpolation between the sorted samples)."""
    print(f"{'endpoint':<15}{'requests':>9}{'ok':>5}{'p50 s':>8}{'p95 s':>8}{'max s':>8}{'service s':>11}")
    for endpoint in ENDPOINTS:
        mine = [r for r in results if r.endpoint == endpoint]
        ok = [r for r in mine if not r.error]
        if not ok:
            print(f"{endpoint:<15}{len(mine):>9}{0:>5}")
            continue
        latency = np.array([r.seconds for r in ok])
        print(f"{endpoint:<15}{len(mine):>9}{len(ok):>5}{np.percentile(latency, 50):>8.2f}"
              f"{np.percentile(latency, 95):>8.2f}{latency.max():>8.2f}"
              f"{np.mean([r.service_seconds for r in ok]):>11.2f}")


def backend_flags(bench) -> list[str]:
    """The app's flags for --backend: each Ray replica takes one CPU, so it runs torch on one thread."""
    if bench.backend == "local":
        return []
    return ["--backend", "ray", "--replicas", str(bench.replicas), "--replica_cpus", "1"]


def main(argv=None) -> int:
    bench = parse_bench_args(argv)
    print(f"load_test, {date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"backend {bench.backend}{f' ({bench.replicas} replicas)' if bench.backend == 'ray' else ''}; "
          f"{bench.users} users x {bench.requests} requests, time limit {bench.time_limit:.0f} s; tiny models "
          f"({TINY_RESOLUTION} px), {bench.num_inference_steps}-{bench.num_inference_steps + 2} steps, /text2img 2 "
          f"images, /random_batch {bench.batch_images} uploads")
    root = Path(bench.keep or tempfile.mkdtemp(prefix="sdtune-load-test-"))
    root.mkdir(parents=True, exist_ok=True)
    listing = write_models(root)
    port = free_port()
    app = launch_app(listing, root, port, bench.startup_timeout, backend_flags(bench))
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = Deadline(bench.time_limit)
        results: list[Result] = []
        start = time.perf_counter()
        users = []
        for user in range(bench.users):
            folder = root / "uploads" / f"user{user}"
            folder.mkdir(parents=True, exist_ok=True)
            users.append(threading.Thread(target=user_session, args=(url, user, bench, folder, deadline, results)))
        for thread in users:
            thread.start()
        for thread in users:
            thread.join()
        wall = time.perf_counter() - start
    finally:
        stop_app(app)
    print()
    print_table(results)
    failed = [r for r in results if r.error]
    busy = sum(r.service_seconds for r in results if not r.error)
    print(f"{len(results) - len(failed)}/{len(results)} requests succeeded with their own parameters in every PNG; "
          f"{wall:.1f} s for all, {len(results) / wall:.2f} requests/s; the app was generating for {busy:.1f} s "
          f"({busy / wall:.0%} of the wall time; {concurrency(bench)}, the rest is uploads, downloads, Gradio's "
          "own processing and gaps in the queue)")
    for r in failed:
        print(f"FAILED user {r.user} request {r.index} {r.endpoint}: {r.error}")
    if not bench.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


def concurrency(bench) -> str:
    if bench.backend == "local" or bench.replicas == 1:
        return "requests run one at a time"
    return f"up to {bench.replicas} requests run at once, so this can pass 100%"


if __name__ == "__main__":
    sys.exit(main())
