"""The training queue through the real app (`gradio_app.py --train`, in its own process, driven by gradio_client)
when the app dies mid-job: killed alone, its trainer goes on and the restarted app finds it running, then done;
killed with its trainer, the restarted app shows the job interrupted and Resume ends it with an uninterrupted run's
weights. On the way, a job on a corrupt base fails, shown with its error, while the job queued after it runs.

One story, one module fixture (three app starts, four trainer processes), shared by the tests: about 3 min on the
shared 2-core machine."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env

from sdtune.jobs.api import redact
from sdtune.jobs.runner import LOG_FILE, OUTPUT_FOLDER, RECIPE_FILE, job_processes
from sdtune.jobs.store import JobStore

WEIGHTS = "pytorch_lora_weights.safetensors"
STEPS, CHECKPOINT_EVERY = 10, 4
ADVANCED = "validation_inference_steps: 2\nlora_rank: 4\n"
ENDED = ("done", "failed", "stopped", "interrupted")


def settings(base, data) -> dict:
    """configs/tiny-lora.yaml on the test's tiny pipeline and shapes: 10 steps at 32 px, a checkpoint every 4."""
    return {"pretrained_model_name_or_path": str(base), "train_data_dir": str(data), "max_train_steps": STEPS,
            "resolution": 32, "train_batch_size": 4, "gradient_accumulation_steps": 1,
            "checkpointing_steps": CHECKPOINT_EVERY, "validation_prompts": ["a red circle"], "seed": 7}


class App:
    """gradio_app.py --train on loopback, started and SIGKILLed as a process of its own (its threads set)."""

    def __init__(self, root, models_list, data_root, models_root):
        self.root, self.process, self.starts = root, None, 0
        self.flags = ["--models", str(models_list), "--lazy", "--train", "--device", "cpu", "--host", "127.0.0.1",
                      "--output_dir", str(root / "app"), "--data_root", str(data_root),
                      "--models_root", str(models_root), "--allowed-root", str(root / "allowed")]
        self.env = dict(subprocess_env(threads=1), GRADIO_ANALYTICS_ENABLED="False",
                        GRADIO_TEMP_DIR=str(root / "gradio-cache"))

    @property
    def jobs_root(self):
        return self.root / "app" / "jobs"

    def start(self, timeout: float = 300):
        """Start the app and return a gradio_client on it once it answers."""
        from gradio_client import Client

        self.starts += 1
        port, log = free_port(), self.root / f"app-{self.starts}.log"
        with open(log, "w") as out:
            self.process = subprocess.Popen([sys.executable, "gradio_app.py", *self.flags, "--port", str(port)],
                                            cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"the app exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the app did not answer:\n{log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                return Client(f"http://127.0.0.1:{port}/", verbose=False)
            except OSError:
                time.sleep(0.5)

    def sigkill(self):
        """SIGKILL the app's process only: a trainer it launched lives in a session of its own."""
        self.process.kill()
        self.process.wait()

    def job(self, job_id):
        """The job's record as the store holds it (the test reads the app's SQLite file, as a new app would)."""
        return JobStore(self.jobs_root / "jobs.sqlite").get(job_id)

    def folder(self, job_id):
        return self.jobs_root / self.job(job_id).folder

    def trainer_processes(self, job_id):
        job = self.job(job_id)
        return job_processes(job.pid, self.jobs_root / job.folder / RECIPE_FILE)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def poll_status(client, job_id, until, timeout: float = 600, every: float = 0.2) -> dict:
    """/train_status on a timer, as the page reads it, until `until(status)`."""
    deadline = time.monotonic() + timeout
    while not until(status := client.predict(job_id, api_name="/train_status")):
        assert time.monotonic() < deadline, status
        time.sleep(every)
    return status


def corrupt_copy(pipeline, folder):
    """The tiny pipeline with its UNet's weights replaced by bytes that are not a safetensors file."""
    shutil.copytree(pipeline, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file" * 64)
    return folder


@pytest.fixture(scope="module")
def story(tmp_path_factory, tiny_pipeline, shapes_dataset):
    root = tmp_path_factory.mktemp("jobs-app")
    models_list = root / "models.yaml"
    models_list.write_text(f"models:\n  - name: stock\n    path: {tiny_pipeline}\n")
    corrupt = corrupt_copy(tiny_pipeline, root / "models" / "corrupt")
    app = App(root, models_list, shapes_dataset.parent, root / "models")
    seen = {"app": app, "server_root": tmp_path_factory.getbasetemp()}
    recipe = settings(tiny_pipeline, shapes_dataset)
    try:
        # 1. the app SIGKILLed alone while its job trains
        client = app.start()
        straight = seen["straight"] = client.predict("straight", "tiny-lora", recipe, ADVANCED,
                                                     api_name="/train_start")
        poll_status(client, straight, lambda status: status["step"] >= 1 or status["state"] != "running")
        app.sigkill()
        # held still while the app restarts (a tiny job would otherwise end first); a stopped process still runs
        os.killpg(app.job(straight).pid, signal.SIGSTOP)
        seen["alive_after_kill"] = bool(app.trainer_processes(straight))
        seen["straight_before"] = app.job(straight)
        client = app.start()
        seen["straight_found"] = client.predict(straight, api_name="/train_status")
        seen["straight_after_restart"] = app.job(straight)
        os.killpg(app.job(straight).pid, signal.SIGCONT)
        seen["straight_done"] = poll_status(client, straight, lambda status: status["state"] in ENDED)

        # 2. the app and the trainer SIGKILLed once the job has a checkpoint, before it ends
        resumed = seen["resumed"] = client.predict("resumed", "tiny-lora", recipe, ADVANCED, api_name="/train_start")
        output = app.folder(resumed) / OUTPUT_FOLDER
        deadline = time.monotonic() + 600
        while not (output / f"checkpoint-{CHECKPOINT_EVERY}").is_dir():
            assert app.job(resumed).state == "running" and time.monotonic() < deadline
            time.sleep(0.02)
        app.sigkill()
        os.killpg(app.job(resumed).pid, signal.SIGKILL)
        seen["killed_before_the_end"] = not (output / WEIGHTS).exists()
        client = app.start()
        seen["resumed_found"] = client.predict(resumed, api_name="/train_status")

        # 3. a job on a corrupt base starts first; the resumed job waits for it, then runs
        failing = seen["failing"] = client.predict("corrupt base", "tiny-lora",
                                                   {**recipe, "pretrained_model_name_or_path": str(corrupt)},
                                                   ADVANCED, api_name="/train_start")
        seen["resume_answer"] = client.predict(resumed, api_name="/train_resume")
        seen["failing_while_queued"] = client.predict(failing, api_name="/train_status")
        seen["resumed_done"] = poll_status(client, resumed, lambda status: status["state"] in ENDED)
        seen["failing_end"] = client.predict(failing, api_name="/train_status")
        seen["list"] = client.predict(api_name="/train_list")
        yield seen
    finally:
        if app.process is not None and app.process.poll() is None:
            app.sigkill()
        for job in JobStore(app.jobs_root / "jobs.sqlite").list(["running"]):
            if job_processes(job.pid, app.jobs_root / job.folder / RECIPE_FILE):  # a failed test's leftover
                os.killpg(job.pid, signal.SIGKILL)


def lora_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / OUTPUT_FOLDER / WEIGHTS))


@pytest.mark.slow  # an app and training processes
def test_the_app_killed_alone_finds_its_job_running_and_the_job_finishes(story):
    app, job_id = story["app"], story["straight"]
    before, after = story["straight_before"], story["straight_after_restart"]
    assert story["alive_after_kill"] and before.state == "running"  # the trainer outlived the app
    assert story["straight_found"]["state"] == "running" and after.pid == before.pid  # found again, not relaunched
    assert story["straight_found"]["step"] >= 1  # its live view goes on from the files
    done = story["straight_done"]
    assert done["state"] == "done" and done["error"] is None, done["log_tail"]
    assert done["step"] == done["total_steps"] == STEPS
    assert (app.folder(job_id) / OUTPUT_FOLDER / WEIGHTS).is_file()
    assert (app.folder(job_id) / LOG_FILE).read_text().count("$ bash train.sh --config job.yaml") == 1


@pytest.mark.slow  # an app and training processes
def test_the_app_and_trainer_killed_show_interrupted_and_resume_ends_as_the_uninterrupted_run(story):
    import torch

    app, job_id = story["app"], story["resumed"]
    assert story["killed_before_the_end"]
    found = story["resumed_found"]
    assert found["state"] == "interrupted" and "Resume" in found["error"], found
    assert story["resumed_done"]["state"] == "done", story["resumed_done"]["log_tail"]
    train_log = (app.folder(job_id) / OUTPUT_FOLDER / "train.log").read_text()
    assert "Resumed from " in train_log and f"checkpoint-{CHECKPOINT_EVERY}" in train_log
    straight, resumed = lora_weights(app.folder(story["straight"])), lora_weights(app.folder(job_id))
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


@pytest.mark.slow  # an app and training processes
def test_a_failed_job_shows_its_error_while_the_next_job_runs(story):
    app, failing, resumed = story["app"], story["failing"], story["resumed"]
    assert story["resume_answer"]["state"] == "queued"  # the corrupt-base job was running: one at a time
    assert story["failing_while_queued"]["state"] == "running"
    end = story["failing_end"]
    assert end["state"] == "failed" and "exited with status" in end["error"], end
    assert any("Cannot load the pipeline '…/corrupt'" in line for line in end["log_tail"]), end["log_tail"]
    shown = [end["error"], *end["log_tail"]]
    server_paths = [str(story["server_root"]), str(REPO), str(Path(sys.executable).resolve().parents[1])]  # the venv
    assert not [text for text in shown if any(path in text for path in server_paths)]
    assert app.job(resumed).started >= app.job(failing).ended  # the next job started once the failed one ended
    assert [(job["id"], job["state"]) for job in story["list"]] == [
        (story["straight"], "done"), (resumed, "done"), (failing, "failed")]


def test_status_lines_name_no_server_path():
    job = Path("/srv/app/jobs/00003-x")
    lines = ["Cannot load the pipeline '/srv/models/corrupt': see /srv/models/corrupt/unet/weights.safetensors",
             f'  File "{REPO}/sdtune/training/loop.py", line 9', f"--config {job}/job.yaml",
             '  File "/opt/venv/lib/python3.11/site-packages/accelerate/launch.py", line 999',
             "steps:  60%|###   | 3/5 [00:04<00:02, 1.05s/it, loss=0.1234] JOB/output/validation/step-000002.png"]
    assert [redact(line, job) for line in lines] == [
        "Cannot load the pipeline '…/corrupt': see …/weights.safetensors", '  File "./sdtune/training/loop.py", line 9',
        "--config JOB/job.yaml", '  File "…/launch.py", line 999', lines[-1]]
