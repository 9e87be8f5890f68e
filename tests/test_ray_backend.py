"""The Ray Serve backend (sdtune/app/ray_backend.py): its flags, and one local deployment (2 replicas of 1 CPU each on a
2-CPU Ray cluster, tiny models, one model per replica so that multiplexing evicts) shared by the module, because
starting Ray and two replicas costs most of these tests' time."""

import importlib.util
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.app.flags import parse_app_args
from sdtune.app.launch import generation_backend
from sdtune.app.service import RequestError, Service
from sdtune.errors import SdtuneError
from sdtune.generation.backend import LocalBackend
from sdtune.generation.core import GenerationSettings
from sdtune.generation.registry import ModelRegistry, ModelSpec, ModelUnavailable

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray Serve is optional: pip install -r requirements-serve.txt")
SETTINGS = GenerationSettings(num_inference_steps=3, width=64, height=64)


def test_ray_flags_are_checked_before_anything_loads(monkeypatch):
    with pytest.raises(SdtuneError, match="--replicas apply to --backend ray only"):
        parse_app_args(["--replicas", "2"])
    for value in ("3", "4:2", "a:b", "0:0"):
        with pytest.raises(SdtuneError, match="--autoscale must be MIN:MAX"):
            parse_app_args(["--backend", "ray", "--autoscale", value])
    with pytest.raises(SdtuneError, match="not both"):
        parse_app_args(["--backend", "ray", "--autoscale", "1:2", "--replicas", "2"])
    assert parse_app_args(["--backend", "ray", "--autoscale", "0:4"]).autoscale == (0, 4)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None)
    with pytest.raises(SdtuneError, match=r"pip install -r requirements-serve.txt"):
        parse_app_args(["--backend", "ray"])


def test_the_local_backend_never_imports_ray(monkeypatch, tiny_pipeline, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` now fails
    registry = ModelRegistry([ModelSpec("stock", str(tiny_pipeline))], device="cpu", lazy=True)
    backend = generation_backend(parse_app_args([]), registry)
    outcome = Service(registry, tmp_path, tmp_path, backend=backend).text2img("a red circle", "stock", 1, 1, SETTINGS)
    assert isinstance(backend, LocalBackend) and outcome.paths[0].is_file()


@needs_ray
def test_an_address_where_nothing_answers_fails_at_once():
    from sdtune.app import ray_backend

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(SdtuneError, match=f"--ray_address {refused}: cannot reach a Ray head there within 5 s"):
        ray_backend.connect(refused, 1)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_pipeline, tiny_adapter):
    """The Ray backend serving stock, a LoRA on it and a model that cannot load; the local backend serving the first
    two in this process, for reference."""
    import ray

    from sdtune.app import ray_backend

    specs = [ModelSpec("stock", str(tiny_pipeline)),
             ModelSpec("lora", str(tiny_pipeline), lora=str(tiny_adapter), lora_scale=0.5),
             ModelSpec("broken", str(tmp_path_factory.mktemp("ray") / "missing-model"))]
    remote = ray_backend.start(ModelRegistry(specs, device="cpu", lazy=True), replicas=2, replica_cpus=1,
                               models_per_replica=1, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each replica: another thread count changes the float rounding of the images
    yield remote, LocalBackend(ModelRegistry(specs[:2], device="cpu"))
    torch.set_num_threads(threads)
    ray.shutdown()  # ends every process of the local cluster at once; serve.shutdown() first would wait for the
    # replica that Serve is starting in place of the one killed


def assert_same(first, second, what=None) -> None:
    """Pixel for pixel; the message gives each image's largest difference in levels of 255."""
    differences = [np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() for a, b in zip(first, second)]
    assert len(first) == len(second) and not any(differences), (what, differences)


@needs_ray
@pytest.mark.slow  # a local Ray cluster of 2 replicas
def test_the_same_request_gives_the_same_image_through_either_backend(deployment):
    remote, local = deployment
    # stock, its LoRA at two scales and stock again: with one model per replica, each switch evicts and reloads
    for model, scale in (("stock", None), ("lora", None), ("lora", 1.0), ("stock", None)):
        assert_same(remote.text_to_images(model, scale, "a red circle", [3, 4], SETTINGS),
                    local.text_to_images(model, scale, "a red circle", [3, 4], SETTINGS), (model, scale))
    image = local.text_to_images("stock", None, "a blue square", [5], SETTINGS)[0].resize((80, 48))
    edit = ("lora", None, [image], ["a red circle"], [7], SETTINGS, 64)
    assert_same(remote.images_to_images(*edit), local.images_to_images(*edit))
    assert "2 running" in remote.status()


@needs_ray
@pytest.mark.slow
def test_a_model_that_cannot_load_fails_its_own_request_only(deployment, tmp_path):
    remote, local = deployment
    service = Service(remote.registry, tmp_path, tmp_path, backend=remote)
    with pytest.raises(RequestError, match="Model 'broken' could not be loaded"):
        service.text2img("a red circle", "broken", 1, 1, SETTINGS)
    with pytest.raises(ModelUnavailable, match="Unknown model 'nope'"):
        remote.load("nope")
    outcome = service.text2img("a red circle", "stock", 1, 2, SETTINGS)
    assert_same([Image.open(path).convert("RGB") for path in outcome.paths],
                local.text_to_images("stock", None, "a red circle", [1, 2], SETTINGS))


@pytest.fixture(scope="module")
def ray_app(deployment, tmp_path_factory):
    """The app in front of the deployment, as `gradio_app.py --backend ray` serves it: one request per replica."""
    from sdtune.app.launch import LAUNCH_OPTIONS
    from sdtune.app.ui.blocks import build_ui

    remote, _ = deployment
    root = tmp_path_factory.mktemp("ray-app")
    demo = build_ui(Service(remote.registry, root / "outputs", root, backend=remote))
    demo.queue(default_concurrency_limit=1)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True, **LAUNCH_OPTIONS)
    yield demo.local_url, remote
    demo.close()


# 8 images x 100 steps at 128x64 (6.6 megapixel-steps, under the CPU's limit of 8): about 40 s on a replica of this
# 2-core machine, and a denoising step (where a stopped generation ends) well under a second
LONG = dict(prompt="a red circle", negative_prompt="", model="stock", scheduler="dpmsolver++", num_inference_steps=100,
            guidance_scale=7.5, width=128, height=64, seed=1, num_images=8)
SHORT = dict(LONG, num_inference_steps=3, width=64, num_images=1)
LONG_CELL = dict(prompt="a red circle", negative_prompt="", models=["stock"], axis="seed", values="1", seed=1,
                 scheduler="dpmsolver++", num_inference_steps=100, guidance_scale=7.5, width=256, height=256)
PROMPT_START = 10.0  # seconds the next requests may take, the cancelled ones' replicas freed: a long one takes ~40 s


def both_replicas_running(remote) -> None:
    """Wait for the two replicas (one killed by an earlier test is replaced within seconds)."""
    deadline = time.monotonic() + 60
    while "2 running" not in remote.status():
        assert time.monotonic() < deadline, remote.status()
        time.sleep(0.5)


def assert_next_requests_start_promptly(url, after: str) -> None:
    """Two short requests at once, from two clients: each needs a replica, so both replicas must be free."""
    from gradio_client import Client

    def answered() -> float:
        Client(url, verbose=False).predict(**SHORT, api_name="/text2img")
        return time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        seconds = max(pool.map(lambda _: answered(), range(2)))
    print(f"the next two requests, {after}: {seconds:.1f} s")  # the figure the README quotes (pytest -s shows it)
    assert seconds < PROMPT_START, f"the next requests, {after}, took {seconds:.1f} s: a replica was still busy"


@needs_ray
@pytest.mark.slow
def test_a_request_cancelled_by_its_client_frees_its_replica(ray_app):
    from gradio_client import Client

    url, remote = ray_app
    both_replicas_running(remote)
    # a long text-to-image request on one replica, a long Compare cell (one 256 px image at 100 steps) on the other,
    # each from its own client; neither shows a preview through Ray, so only the cancel can end them early (the
    # cell is shorter than the text-to-image request: with Compare's own part of the fix reverted this still passed)
    jobs = [Client(url, verbose=False).submit(**LONG, api_name="/text2img"),
            Client(url, verbose=False).submit(**LONG_CELL, api_name="/compare")]
    time.sleep(2.5)  # both under way on their replicas
    for job in jobs:
        job.cancel()
    assert_next_requests_start_promptly(url, "two long ones cancelled")


@needs_ray
@pytest.mark.slow
def test_a_client_that_goes_away_frees_its_replica(ray_app):
    import contextlib

    import httpx

    url, remote = ray_app
    both_replicas_running(remote)
    data = [LONG[name] for name in ("prompt", "negative_prompt", "model", "scheduler", "num_inference_steps",
                                    "guidance_scale", "width", "height", "seed", "num_images")]
    with contextlib.ExitStack() as connections:  # two clients reading their answers' streams, one per replica
        for _ in range(2):
            event = httpx.post(f"{url}gradio_api/call/text2img",
                               json={"data": [*data, None, {"headers": ["LoRA", "weight"], "data": []}]})
            connections.enter_context(httpx.stream("GET", f"{url}gradio_api/call/text2img/"
                                                   f"{event.json()['event_id']}", timeout=120))
        time.sleep(2.5)
    # both connections closed, as by a browser tab closed or a client killed mid-request
    assert_next_requests_start_promptly(url, "two clients of long ones gone")


@needs_ray
@pytest.mark.slow
def test_a_replica_killed_under_load_loses_no_request(deployment):
    import ray

    from sdtune.app.ray_backend import ReplicaLost

    remote, local = deployment
    settings = GenerationSettings(num_inference_steps=12, width=64, height=64)  # long enough to be killed mid-way
    seeds = list(range(10, 18))
    with ThreadPoolExecutor(len(seeds)) as pool:
        futures = [pool.submit(remote.text_to_images, "stock", None, "a red circle", [seed], settings)
                   for seed in seeds]
        while not any(future.done() for future in futures):  # the load is under way on both replicas
            time.sleep(0.05)
        replica = next(actor for actor in ray.util.list_named_actors(all_namespaces=True)
                       if actor["name"].startswith("SERVE_REPLICA"))
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    completed = 0
    for seed, future in zip(seeds, futures):
        try:
            images = future.result()
        except ReplicaLost:  # the clear error a caller gets if the retry's replica died too
            continue
        assert_same(images, local.text_to_images("stock", None, "a red circle", [seed], settings), seed)
        completed += 1
    assert completed == len(seeds)  # each was resent once to the replica still up
    assert_same(remote.text_to_images("stock", None, "a red circle", [1], SETTINGS),
                local.text_to_images("stock", None, "a red circle", [1], SETTINGS))


def test_unloading_a_lora_model_keeps_its_base_serving(tiny_pipeline, tiny_adapter):
    registry = ModelRegistry([ModelSpec("stock", str(tiny_pipeline)),
                              ModelSpec("lora", str(tiny_pipeline), lora=str(tiny_adapter))], device="cpu")
    before = LocalBackend(registry).text_to_images("stock", None, "a red circle", [1], SETTINGS)
    registry.unload("lora")
    registry.unload("lora")  # a second eviction of the same model does nothing
    assert not any(registry.get("stock").get_list_adapters().values())
    assert_same(LocalBackend(registry).text_to_images("stock", None, "a red circle", [1], SETTINGS), before)
    registry.unload("stock")
    assert not registry._bases and not registry._components
