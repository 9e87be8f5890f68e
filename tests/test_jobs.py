"""Training jobs (sdtune/jobs): the store's life cycle, the refused requests, and real tiny LoRA jobs run through the
runner in their own processes: the same weights as the trainer run directly, found again by a new runner (the app
restarted), one after the other."""

import math
import os
import signal
import subprocess
import time

import pytest
import yaml
from helpers import run_in_process, subprocess_env

from sdtune.jobs.api import TrainingJobs, wait_for
from sdtune.jobs.recipe import sanitise_name
from sdtune.jobs.runner import LOG_FILE, OUTPUT_FOLDER, RECIPE_FILE
from sdtune.jobs.store import JobError, JobStore

ENDED = ("done", "failed", "stopped", "interrupted")


def tiny_settings(pipeline, data, steps: int) -> dict:
    """configs/tiny-lora.yaml's recipe on the test's tiny pipeline and shapes, for a few steps at 32 px."""
    return {"pretrained_model_name_or_path": str(pipeline), "train_data_dir": str(data), "max_train_steps": steps,
            "resolution": 32, "train_batch_size": 4, "gradient_accumulation_steps": 1, "checkpointing_steps": 2,
            "validation_prompts": ["a red circle"], "seed": 7}


ADVANCED = "validation_inference_steps: 2\nlora_rank: 4\n"


def make_jobs(root, pipeline=None, data=None, **options) -> TrainingJobs:
    data_root = data.parent if data is not None else root / "data"
    model_roots = [pipeline.parent] if pipeline is not None else []
    return TrainingJobs(root / "jobs", data_root, model_roots, env=subprocess_env(threads=1), **options)


@pytest.fixture(scope="module")
def queue_run(tmp_path_factory, tiny_pipeline, shapes_dataset):
    """Two queued tiny LoRA jobs (3 steps, then 2); while the first runs, its runner is forgotten (the app died) and
    a new one takes over from the store, which runs both to the end."""
    root = tmp_path_factory.mktemp("jobs")
    first = make_jobs(root, tiny_pipeline, shapes_dataset)
    a = first.start(None, "first job!", "tiny-lora", tiny_settings(tiny_pipeline, shapes_dataset, 3), ADVANCED)
    b = first.start(None, "second", "tiny-lora", tiny_settings(tiny_pipeline, shapes_dataset, 2), ADVANCED)
    launched = first.store.get(a)
    del first  # the app is gone; the trainer it launched is in its own session and goes on
    jobs = make_jobs(root, tiny_pipeline, shapes_dataset)
    jobs.runner.tick()
    after_restart = {a: jobs.store.get(a), b: jobs.store.get(b)}
    wait_for(jobs, b, ENDED, timeout=900)
    return {"jobs": jobs, "a": a, "b": b, "launched": launched, "after_restart": after_restart}


def test_job_weights_equal_the_same_recipe_run_by_the_trainer(queue_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    jobs, a = queue_run["jobs"], queue_run["a"]
    assert jobs.store.get(a).state == "done", jobs.status(None, a)["log_tail"]
    folder = jobs.runner.folder(jobs.store.get(a))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's process (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        reference = run_in_process(["--config", str(folder / RECIPE_FILE), "--output_dir", str(tmp_path / "ref")])
    finally:
        torch.set_num_threads(threads)
    weights, expected = (load_file(str(path / "pytorch_lora_weights.safetensors"))
                         for path in (folder / OUTPUT_FOLDER, reference))
    assert weights.keys() == expected.keys() and weights
    for name in weights:
        assert torch.equal(weights[name], expected[name]), name


def test_a_job_outlives_its_runner_and_a_new_runner_finds_it_running(queue_run):
    jobs, a, b = queue_run["jobs"], queue_run["a"], queue_run["b"]
    launched, after_restart = queue_run["launched"], queue_run["after_restart"]
    assert launched.state == "running" and launched.pid
    assert after_restart[a].state == "running" and after_restart[a].pid == launched.pid  # found, not relaunched
    assert after_restart[b].state == "queued"  # one job trains at a time
    assert jobs.store.get(a).state == "done"
    log = (jobs.runner.folder(jobs.store.get(a)) / LOG_FILE).read_text()
    assert log.count("$ bash train.sh --config job.yaml") == 1


def test_queued_jobs_run_one_after_the_other(queue_run):
    jobs, a, b = queue_run["jobs"], queue_run["a"], queue_run["b"]
    first, second = jobs.store.get(a), jobs.store.get(b)
    assert first.state == second.state == "done"
    assert second.started >= first.ended
    assert [job["id"] for job in jobs.list(None)] == [a, b]
    assert jobs.runner.folder(first).name == f"{a:05d}-first-job"


def test_live_status_reads_step_losses_grid_and_log(queue_run):
    jobs, b = queue_run["jobs"], queue_run["b"]
    status = jobs.status(None, b)
    assert status["state"] == "done" and status["step"] == status["total_steps"] == 2
    assert status["steps_per_second"] > 0 and status["seconds_left"] == 0
    assert status["train_loss"] and status["train_loss"][-1][0] == 2
    assert all(math.isfinite(loss) for _, loss in status["train_loss"])
    assert status["latest_grid"].name == "step-000002.png"
    assert status["log_tail"] and not any(str(jobs.jobs_root) in line for line in status["log_tail"])
    assert any("JOB/output/validation/step-000002.png" in line for line in status["log_tail"])  # paths redacted


# The store and the requests: no training


def test_store_allows_the_life_cycle_and_refuses_other_moves(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.add("a", None, lambda job_id: f"{job_id:05d}-a")
    assert job.state == "queued" and job.folder == "00001-a"
    assert store.transition(job.id, "running", pid=123, started=1.0).pid == 123
    with pytest.raises(JobError, match="Job 1 is running: it cannot become queued"):
        store.transition(job.id, "queued")
    store.transition(job.id, "interrupted", ended=2.0)
    store.transition(job.id, "queued")  # Resume
    store.transition(job.id, "running")
    store.transition(job.id, "done")
    with pytest.raises(JobError, match="done is final"):
        store.transition(job.id, "queued")
    with pytest.raises(JobError, match="No training job 9"):
        store.transition(9, "running")
    assert JobStore(tmp_path / "jobs.sqlite").get(job.id).state == "done"  # on disk, for the next app


@pytest.mark.parametrize("settings, advanced, message", [
    ({}, "output_dir: /tmp/elsewhere", "output_dir cannot be set"),
    ({}, "logging_dir: ../../logs", "logging_dir cannot be set"),
    ({}, "cache_dir: /tmp/cache", "cache_dir cannot be set"),
    ({}, "push_to_hub: true", "push_to_hub cannot be set"),
    ({}, "hub_token: secret", "hub_token cannot be set"),
    ({}, "resume_from_checkpoint: /tmp/other-run/checkpoint-2", "resume_from_checkpoint"),
    ({}, "report_to: wandb", "report_to"),
    ({"train_data_dir": "/etc"}, "", "train_data_dir '/etc': outside"),
    ({}, "validation_data_dir: /etc", "validation_data_dir '/etc': outside"),
    ({"pretrained_model_name_or_path": "/etc"}, "", "pretrained_model_name_or_path '/etc': outside"),
    ({"pretrained_model_name_or_path": "../../x y"}, "", "neither a folder"),
    ({}, "learning_rate: fast", "invalid float value: 'fast'"),
    ({}, "lr_scheduler: sometimes", "invalid choice: 'sometimes'"),
    ({}, "resolution: 65", "must be a multiple of 8"),
    ({}, "use_ema: maybe", "use_ema is a switch"),
    ({}, "no_such_flag: 1", "Unknown trainer flags"),
    ({}, "- a list", "flag: value"),
    ({"lora_rank": 4}, "lora_rank: 8", "in the form and in the advanced"),
    ({"output_dir": "x"}, "", "not form settings"),
])
def test_bad_requests_are_refused_before_anything_is_queued(tmp_path, settings, advanced, message):
    jobs = make_jobs(tmp_path)
    with pytest.raises(JobError, match=message) as refused:
        jobs.start(None, "bad", "tiny-lora", settings, advanced)
    assert str(tmp_path) not in str(refused.value) or "/etc" in message
    assert jobs.list(None) == [] and [p.name for p in jobs.jobs_root.iterdir()] == ["jobs.sqlite"]


def test_an_unknown_recipe_is_refused_with_the_recipes_there_are(tmp_path):
    jobs = make_jobs(tmp_path)
    for name in ("../configs/tiny", "models-tiny", "nope"):
        with pytest.raises(JobError, match="tiny-lora"):
            jobs.start(None, "x", name)


def test_names_are_sanitised():
    assert sanitise_name("../../etc/passwd") == "etc-passwd"
    assert sanitise_name("my LoRA: v2") == "my-LoRA-v2"
    assert sanitise_name("...") == "job" and len(sanitise_name("x" * 500)) == 40


# The runner with a stand-in train.sh (bash only, no training): its process handling


@pytest.fixture
def fake_jobs(tmp_path):
    """Jobs whose train.sh is a stand-in: `sleep` (a trainer still running) or `exit 3` (one that fails)."""
    def make(script: str, **options) -> TrainingJobs:
        jobs = make_jobs(tmp_path, **options)
        fake = tmp_path / "bin" / "train.sh"
        fake.parent.mkdir(exist_ok=True)
        fake.write_text(script)
        jobs.runner.train_script = fake
        return jobs

    return make


def test_a_dead_or_foreign_pid_is_marked_interrupted_and_resume_requeues(fake_jobs, tmp_path):
    jobs = fake_jobs("exit 3\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):  # gone; alive but not this job's trainer (a recycled pid)
        job = jobs.store.add("x", None, lambda job_id: f"{job_id:05d}-x")
        (jobs.runner.folder(job) / OUTPUT_FOLDER).mkdir(parents=True)
        (jobs.runner.folder(job) / RECIPE_FILE).write_text("seed: 1\nresume_from_checkpoint: null\n")
        jobs.store.transition(job.id, "running", pid=pid, started=time.time())
        jobs.runner.tick()
        status = jobs.status(None, job.id)
        assert status["state"] == "interrupted" and "Resume" in status["error"]
    assert jobs.resume(None, job.id)["state"] in ("queued", "running")
    assert yaml.safe_load((jobs.runner.folder(job) / RECIPE_FILE).read_text())["resume_from_checkpoint"] == "latest"
    failed = wait_for(jobs, job.id, ENDED, timeout=60)  # the stand-in exits 3: failed, with the status
    assert failed["state"] == "failed" and "status 3" in failed["error"]


@pytest.mark.parametrize("control, sent", [("stop", signal.SIGTERM), ("cancel", signal.SIGKILL)])
def test_stop_and_cancel_signal_the_process_group_and_end_stopped(fake_jobs, control, sent):
    jobs = fake_jobs('trap "echo got TERM; exit 143" TERM\nsleep 60 & wait\n')
    job_id = jobs.start(None, "long", "tiny-lora")
    assert jobs.store.get(job_id).state == "running"
    time.sleep(0.5)  # the stand-in sets its trap
    getattr(jobs, control)(None, job_id)
    ended = wait_for(jobs, job_id, ENDED, timeout=30)
    assert ended["state"] == "stopped" and ended["error"] is None
    log = (jobs.runner.folder(jobs.store.get(job_id)) / LOG_FILE).read_text()
    assert ("got TERM" in log) == (sent == signal.SIGTERM)
    with pytest.raises(JobError, match="only a queued or running job"):
        jobs.stop(None, job_id)


def test_a_queued_job_stops_before_it_starts_and_deletes_with_its_folder(fake_jobs):
    jobs = fake_jobs("sleep 60\n")
    running, queued = jobs.start(None, "a", "tiny-lora"), jobs.start(None, "b", "tiny-lora")
    assert jobs.stop(None, queued)["state"] == "stopped"
    with pytest.raises(JobError, match="is running: stop or cancel it"):
        jobs.delete(None, running)
    folder = jobs.runner.folder(jobs.store.get(queued))
    jobs.delete(None, queued)
    assert not folder.exists() and [job["id"] for job in jobs.list(None)] == [running]
    jobs.cancel(None, running)
    wait_for(jobs, running, ENDED, timeout=30)


def test_with_auth_a_job_is_its_owners_only(fake_jobs):
    jobs = fake_jobs("exit 0\n", auth=True)
    job_id = jobs.start("alice", "mine", "tiny-lora")
    assert [job["owner"] for job in jobs.list("alice")] == ["alice"] and jobs.list("bob") == []
    for control in (jobs.status, jobs.stop, jobs.cancel, jobs.resume, jobs.delete):
        with pytest.raises(JobError, match=f"No training job {job_id}"):
            control("bob", job_id)
    with pytest.raises(JobError, match="Sign in"):
        jobs.start(None, "anonymous", "tiny-lora")
    assert wait_for(jobs, job_id, ENDED, timeout=30)["state"] == "done"
