"""What the app's training queue costs a job: the tiny world's LoRA recipe (configs/tiny-lora.yaml, shortened) run as
a job of the app's queue and as `bash train.sh --config` with the same recipe, taking turns in one run; the ratio of
the wall times is the cost.

Through the queue means what `gradio_app.py --train` does: sdtune.jobs.api.TrainingJobs queues the job, its runner's
scheduler thread (the app's interval) launches it and records its end, and the job's live status (step, losses, latest
grid, log tail) and the job list are read on the Train tab's timer while it trains. Its time runs from the request to
the moment the status shows it done, as a user sees it; the scheduler notices the end up to one interval late, so the
time to the trainer's exit (the job's exit_status file) is shown too. The command line's time runs from the command to
its exit, with the job's own job.yaml (its output folder moved). Both get the same environment and thread count.

    python -m tinyworld.datasets data/tinyworld       # once (make data does it)
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/train_overhead.py
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from sdtune.jobs.api import TrainingJobs
from sdtune.jobs.runner import EXIT_STATUS_FILE, RECIPE_FILE

REPOSITORY = Path(__file__).resolve().parents[1]
WEIGHTS = "pytorch_lora_weights.safetensors"
DATA = "data/tinyworld/pokemon/train"  # configs/tiny-lora.yaml's train_data_dir


def watch(jobs: TrainingJobs, job_id: int, every: float, done: threading.Event) -> None:
    """Read the job's live view and the job list on the page's timer, as a browser left open does."""
    while not done.wait(every):
        jobs.status(None, job_id)
        jobs.list(None)


def through_queue(jobs: TrainingJobs, settings: dict, poll_seconds: float, name: str) -> tuple[float, float, Path]:
    """Seconds from the request to the status showing the job done and to its trainer's exit (the wrapper's
    exit_status file), and the job's recipe."""
    done = threading.Event()
    start, start_clock = time.perf_counter(), time.time()
    job_id = jobs.start(None, name, "tiny-lora", settings)
    watcher = threading.Thread(target=watch, args=(jobs, job_id, poll_seconds, done), daemon=True)
    watcher.start()
    while (state := jobs.store.get(job_id).state) in ("queued", "running"):  # ended by the scheduler thread
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    folder = jobs.runner.folder(jobs.store.get(job_id))
    if state != "done":
        raise SystemExit(f"job {job_id} ended {state}; see {folder / 'job.log'}")
    return seconds, (folder / EXIT_STATUS_FILE).stat().st_mtime - start_clock, folder / RECIPE_FILE


def command_line(recipe: Path, output_dir: Path, env: dict) -> float:
    """Seconds of `bash train.sh --config RECIPE` (the job's recipe, writing to `output_dir`)."""
    values = {**yaml.safe_load(recipe.read_text()), "output_dir": str(output_dir)}
    own_recipe = output_dir.with_suffix(".yaml")
    own_recipe.write_text(yaml.safe_dump(values, sort_keys=False))
    start = time.perf_counter()
    with open(output_dir.with_suffix(".log"), "wb") as log:
        subprocess.run(["bash", "train.sh", "--config", str(own_recipe)], cwd=REPOSITORY, env=env, check=True,
                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if not (output_dir / WEIGHTS).is_file():
        raise SystemExit(f"train.sh wrote no {WEIGHTS} in {output_dir}")
    return seconds


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f}, min {min(values):.3f}, max {max(values):.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode, taking turns")
    parser.add_argument("--max_train_steps", type=int, default=80)
    parser.add_argument("--poll_seconds", type=float, default=3.0,
                        help="the live view's period (the Train tab's timer: 3 s)")
    parser.add_argument("--scheduler_seconds", type=float, default=2.0,
                        help="the queue's scheduler interval (the app's: Runner.start_scheduler's default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of both")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders")
    args = parser.parse_args(argv)
    if not (REPOSITORY / DATA).is_dir():
        raise SystemExit(f"No {DATA}: run `python -m tinyworld.datasets data/tinyworld` (or make data) first.")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPOSITORY))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # a short tiny-lora run that still checkpoints once and validates at its end (the recipe's), as a real job does
    settings = {"max_train_steps": args.max_train_steps, "checkpointing_steps": args.max_train_steps // 2, "seed": 1234}
    root = Path(tempfile.mkdtemp(prefix="train-overhead-", dir=REPOSITORY / "outputs"
                                 if (REPOSITORY / "outputs").is_dir() else None))
    jobs = TrainingJobs(root / "jobs", REPOSITORY / "data", [REPOSITORY / "tinyworld"], env=env)
    jobs.runner.start_scheduler(args.scheduler_seconds)
    times = {"queue": [], "queue, trainer's exit": [], "train.sh": []}
    try:
        for round_ in range(args.rounds):
            # alternate which goes first; the queue's job comes first in round 1, so that the command line runs
            # the recipe the queue wrote (every job's is the same but for its output folder)
            for mode in ("queue", "train.sh") if round_ % 2 == 0 else ("train.sh", "queue"):
                if mode == "queue":
                    seconds, exited, recipe = through_queue(jobs, settings, args.poll_seconds, f"round-{round_ + 1}")
                    times["queue, trainer's exit"].append(exited)
                else:
                    seconds = command_line(recipe, root / f"cli-{round_ + 1}", env)
                times[mode].append(seconds)
                print(f"round {round_ + 1}: {mode:8s} {seconds:7.2f} s", flush=True)
    finally:
        jobs.runner.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.rounds} rounds, tiny-lora for {args.max_train_steps} steps, {args.threads} threads; the live view "
          f"read every {args.poll_seconds:g} s, the scheduler every {args.scheduler_seconds:g} s")
    for mode, values in times.items():
        print(f"{mode + ':':23s} {spread(values)} s")
    for mode in ("queue", "queue, trainer's exit"):
        ratios = [queued / plain for queued, plain in zip(times[mode], times["train.sh"])]
        print(f"ratio {mode} / train.sh, per round: {spread(ratios)}; of the medians: "
              f"{statistics.median(times[mode]) / statistics.median(times['train.sh']):.3f} (target <= 1.03)")


if __name__ == "__main__":
    main()
