"""Training jobs (sdtune/jobs): the store's life cycle, the refused requests, and real tiny LoRA jobs run through the
runner in their own processes: the same weights as the trainer run directly, found again by a new runner (the app
restarted), one after the other."""

import json
import math
import os
import signal
import subprocess
import time

import pytest
import yaml
from helpers import LORA, run_in_process, subprocess_env, tiny_flags

from sdtune.jobs.api import FinishedJob, TrainingJobs, wait_for
from sdtune.jobs.recipe import sanitise_name
from sdtune.jobs.runner import LOG_FILE, OUTPUT_FOLDER, RECIPE_FILE
from sdtune.jobs.store import JobError, JobStore
from sdtune.training.stopping import STOPPED_FILE

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


@pytest.mark.slow  # training processes (the queue's real jobs) or in-process training runs
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


@pytest.mark.slow  # training processes (the queue's real jobs) or in-process training runs
def test_a_job_outlives_its_runner_and_a_new_runner_finds_it_running(queue_run):
    jobs, a, b = queue_run["jobs"], queue_run["a"], queue_run["b"]
    launched, after_restart = queue_run["launched"], queue_run["after_restart"]
    assert launched.state == "running" and launched.pid
    assert after_restart[a].state == "running" and after_restart[a].pid == launched.pid  # found, not relaunched
    assert after_restart[b].state == "queued"  # one job trains at a time
    assert jobs.store.get(a).state == "done"
    log = (jobs.runner.folder(jobs.store.get(a)) / LOG_FILE).read_text()
    assert log.count("$ bash train.sh --config job.yaml") == 1


@pytest.mark.slow  # training processes (the queue's real jobs) or in-process training runs
def test_queued_jobs_run_one_after_the_other(queue_run):
    jobs, a, b = queue_run["jobs"], queue_run["a"], queue_run["b"]
    first, second = jobs.store.get(a), jobs.store.get(b)
    assert first.state == second.state == "done"
    assert second.started >= first.ended
    assert [job["id"] for job in jobs.list(None)] == [a, b]
    assert jobs.runner.folder(first).name == f"{a:05d}-first-job"


@pytest.mark.slow  # training processes (the queue's real jobs) or in-process training runs
def test_live_status_reads_step_losses_grid_and_log(queue_run):
    jobs, b = queue_run["jobs"], queue_run["b"]
    status = jobs.status(None, b)
    assert status["state"] == "done" and status["step"] == status["total_steps"] == 2
    assert status["steps_per_second"] > 0 and status["seconds_left"] == 0
    assert status["train_loss"] and status["train_loss"][-1][0] == 2
    assert all(math.isfinite(loss) for _, loss in status["train_loss"])
    assert status["latest_grid"].name == "step-000002.png"
    assert [grid.name for grid in status["grids"]] == ["step-000002.png"]  # the end of the run only
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


# Stop: the trainer's SIGTERM handler (sdtune/training/stopping.py)


@pytest.mark.slow  # training processes (the queue's real jobs) or in-process training runs
def test_sigterm_saves_a_checkpoint_at_the_step_and_resume_ends_as_an_uninterrupted_run(
        tiny_pipeline, shapes_dataset, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from sdtune.training import loop
    from sdtune.training.checkpoints import list_checkpoints

    def flags(output_dir, *extra):
        return tiny_flags(tiny_pipeline, shapes_dataset, output_dir, "--resolution", "32", "--use_ema", *LORA, *extra)

    record = loop.StepLog.record

    def record_then_terminate(self, step, loss, learning_rate):
        record(self, step, loss, learning_rate)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as the app's Stop does, in the middle of the run

    monkeypatch.setattr(loop.StepLog, "record", record_then_terminate)
    stopped = run_in_process(flags(tmp_path / "stopped"))
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only
    assert json.loads((stopped / STOPPED_FILE).read_text()) == {"step": 2}
    assert [path.name for path in list_checkpoints(stopped)] == ["checkpoint-2"]  # not a periodic one (every 1000)
    assert not (stopped / "pytorch_lora_weights.safetensors").exists()
    run_in_process(flags(stopped, "--resume_from_checkpoint", "latest"))
    assert not (stopped / STOPPED_FILE).exists()
    straight = load_file(str(run_in_process(flags(tmp_path / "straight")) / "pytorch_lora_weights.safetensors"))
    resumed = load_file(str(stopped / "pytorch_lora_weights.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


STOP_STEPS = 100


@pytest.mark.slow  # training processes (the queue's real jobs) or in-process training runs
def test_stop_through_the_runner_stops_the_trainer_at_a_checkpoint_and_resume_finishes(
        tmp_path, tiny_pipeline, shapes_dataset):
    jobs = make_jobs(tmp_path, tiny_pipeline, shapes_dataset)
    # the stop, sent once the first step shows, lands seconds before the end (about 0.08 s a step; 400 steps
    # took 4x the time and showed nothing more)
    settings = {**tiny_settings(tiny_pipeline, shapes_dataset, STOP_STEPS), "checkpointing_steps": 1000}
    job_id = jobs.start(None, "long", "tiny-lora", settings, ADVANCED)
    deadline = time.monotonic() + 300
    while jobs.status(None, job_id)["step"] < 1:  # training, not still loading
        assert jobs.store.get(job_id).state == "running" and time.monotonic() < deadline
        time.sleep(0.1)
    jobs.stop(None, job_id)
    stopped = wait_for(jobs, job_id, ENDED, timeout=120)
    output = jobs.runner.folder(jobs.store.get(job_id)) / OUTPUT_FOLDER
    assert stopped["state"] == "stopped", jobs.status(None, job_id)["log_tail"]
    step = json.loads((output / STOPPED_FILE).read_text())["step"]
    assert 1 <= step < STOP_STEPS and (output / f"checkpoint-{step}").is_dir()
    jobs.resume(None, job_id)
    assert wait_for(jobs, job_id, ENDED, timeout=600)["state"] == "done"
    assert f"Resumed from {output / f'checkpoint-{step}'} at step {step}" in (output / "train.log").read_text()
    assert jobs.status(None, job_id)["step"] == STOP_STEPS


# Save now / Sample now: the trainer's request files (sdtune/training/on_demand.py)


@pytest.mark.slow  # an in-process training run
def test_save_and_sample_requests_give_a_checkpoint_and_a_grid_at_that_step(tiny_pipeline, shapes_dataset, tmp_path,
                                                                            monkeypatch):
    from sdtune.training import loop
    from sdtune.training.checkpoints import list_checkpoints
    from sdtune.training.on_demand import REQUEST_FILES, leave_request

    output = tmp_path / "run"
    output.mkdir()
    leave_request(output, "sample")  # left by an earlier run: cleared at the start, no grid at step 1
    record = loop.StepLog.record
    asked = {1: ["save"], 2: ["save", "sample"]}

    def record_then_ask(self, step, loss, learning_rate):
        record(self, step, loss, learning_rate)
        for what in asked.get(step, []):
            leave_request(output, what)  # as the app's Save now / Sample now, in the middle of the run

    monkeypatch.setattr(loop.StepLog, "record", record_then_ask)
    run_in_process(tiny_flags(tiny_pipeline, shapes_dataset, output, "--resolution", "32", *LORA,
                              "--max_train_steps", "3", "--checkpoints_total_limit", "1",
                              "--validation_prompts", "a red circle"))
    # checkpoint-1 and checkpoint-2 were saved (not periodic ones: every 1000), the limit of 1 kept the last
    assert [path.name for path in list_checkpoints(output)] == ["checkpoint-2"]
    assert "Saved" in (output / "train.log").read_text() and "checkpoint-1" in (output / "train.log").read_text()
    # the grid of step 2 on request, and the final one the export renders
    assert sorted(path.name for path in (output / "validation").glob("*.png")) == ["step-000002.png",
                                                                                   "step-000003.png"]
    assert not any((output / name).exists() for name in REQUEST_FILES.values())


# The app: --train's flag check and its API endpoints


@pytest.mark.parametrize("flags, refused", [
    (["--train"], False),
    (["--train", "--share"], True),
    (["--train", "--host", "0.0.0.0"], True),
    (["--train", "--host", "0.0.0.0", "--auth", "ann:secret"], False),
    (["--share"], False),  # without --train: a warning only (launch.py)
])
def test_train_needs_auth_when_the_app_is_reachable_from_elsewhere(monkeypatch, flags, refused):
    from sdtune.app.flags import AUTH_VARIABLE, parse_app_args
    from sdtune.errors import SdtuneError

    monkeypatch.delenv(AUTH_VARIABLE, raising=False)
    if refused:
        with pytest.raises(SdtuneError, match="--train with .* needs --auth"):
            parse_app_args(flags)
    else:
        assert parse_app_args(flags).train == ("--train" in flags)


def test_train_endpoints_through_gradio_client(fake_jobs):
    import gradio as gr
    from gradio_client import Client

    from sdtune.app.ui.train_api import train_endpoints

    jobs = fake_jobs("exit 0\n")
    with gr.Blocks() as demo:
        train_endpoints(jobs)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, show_error=True)
    try:
        client = Client(demo.local_url, verbose=False)
        job_id = client.predict("api job", "tiny-lora", {"max_train_steps": 2}, "", api_name="/train_start")
        wait_for(jobs, job_id, ENDED, timeout=30)
        status = client.predict(job_id, api_name="/train_status")
        assert status["state"] == "done" and status["name"] == "api-job" and status["latest_grid"] is None
        assert status["grids"] == []
        assert [job["id"] for job in client.predict(api_name="/train_list")] == [job_id]
        with pytest.raises(Exception, match="output_dir cannot be set"):
            client.predict("bad", "tiny-lora", {}, "output_dir: /tmp/x", api_name="/train_start")
        with pytest.raises(Exception, match="only a stopped, interrupted or failed job resumes"):
            client.predict(job_id, api_name="/train_resume")
        for endpoint in ("/train_save_now", "/train_sample_now"):
            with pytest.raises(Exception, match="is done: Save now and Sample now reach a running training job"):
                client.predict(job_id, api_name=endpoint)
        with pytest.raises(Exception, match="output holds no model"):  # the stand-in trainer wrote none
            client.predict(job_id, api_name="/train_score")
        folder = jobs.runner.folder(jobs.store.get(job_id))
        assert client.predict(job_id, api_name="/train_delete") == [] and not folder.exists()
        assert client.predict(api_name="/train_list") == []
        with pytest.raises(Exception, match=f"No training job {job_id}"):
            client.predict(job_id, api_name="/train_delete")
    finally:
        demo.close()


# Save now / Sample now and Score through the API; a done job's model served (sdtune/app/job_models.py)


def test_save_and_sample_requests_reach_a_running_job_only(fake_jobs):
    jobs = fake_jobs("sleep 60\n")
    job_id = jobs.start(None, "long", "tiny-lora", {"validation_prompts": ["a red circle"]})
    queued = jobs.start(None, "next", "tiny-lora")
    assert jobs.request(None, job_id, "save")["requested"] == "save"
    output = jobs.runner.folder(jobs.store.get(job_id)) / OUTPUT_FOLDER
    assert (output / "save_now.request").is_file() and jobs.status(None, job_id)["pending_requests"] == ["save"]
    with pytest.raises(JobError, match="ask for 'save'.*or 'sample'"):
        jobs.request(None, job_id, "export")
    with pytest.raises(JobError, match=f"Job {queued} is queued: Save now and Sample now reach a running"):
        jobs.request(None, queued, "sample")
    jobs.cancel(None, job_id)
    wait_for(jobs, job_id, ENDED, timeout=30)
    jobs.cancel(None, queued)
    with pytest.raises(JobError, match="is stopped: Save now"):
        jobs.request(None, job_id, "save")


def lora_output(tmp_path, tiny_adapter, tiny_pipeline):
    """A LoRA job's output as the trainer leaves it: the adapter and the resolved settings naming its base."""
    import shutil

    folder = tmp_path / "lora-output"
    shutil.copytree(tiny_adapter, folder)
    (folder / "training_config.yaml").write_text(yaml.safe_dump({"pretrained_model_name_or_path": str(tiny_pipeline)}))
    return folder


@pytest.mark.parametrize("kind", ["pipeline", "lora"])
def test_a_done_job_is_served_under_its_name_once_and_again_after_a_restart(fake_jobs, tmp_path, tiny_pipeline,
                                                                              tiny_adapter, kind):
    from sdtune.app.job_models import serve_finished, unserve_deleted
    from sdtune.app.models import ModelManager
    from sdtune.generation.registry import ModelRegistry, ModelSpec

    source = tiny_pipeline if kind == "pipeline" else lora_output(tmp_path, tiny_adapter, tiny_pipeline)
    jobs = fake_jobs(f'cp -r "{source}"/. "$(dirname "$2")/{OUTPUT_FOLDER}/"\n')  # "trains": writes the model
    (tmp_path / "models").mkdir()

    def manager(jobs_allowed=True):
        made = ModelManager(ModelRegistry([ModelSpec("stock", str(tiny_pipeline))], device="cpu"), tmp_path / "models",
                            tmp_path / "app")
        if jobs_allowed:
            made.allow_root(jobs.jobs_root)
        return made

    served, changes = manager(), []
    served.on_change(lambda: changes.append("changed"))
    jobs.on_done(lambda finished: serve_finished(served, finished))
    job_id = jobs.start(None, "my.model", "tiny-lora")
    assert wait_for(jobs, job_id, ENDED, timeout=60)["state"] == "done"
    assert "my_model" in served.names and changes == ["changed"]  # the pickers were told
    listed = {model["name"]: model for model in served.listing()}["my_model"]
    assert listed["added"] and listed["kind"].startswith("LoRA" if kind == "lora" else "pipeline")
    jobs.runner.tick()  # a later round does not add it again
    assert changes == ["changed"]
    restarted = manager()
    restarted.restore()
    assert "my_model" in restarted.names
    again = jobs.start(None, "my.model", "tiny-lora")  # the same name again: served as NAME-ID
    wait_for(jobs, again, ENDED, timeout=60)
    assert f"my_model-{again}" in served.names
    outside = manager(jobs_allowed=False)  # the jobs root not allowed: refused, logged, nothing served
    finished = FinishedJob(job_id, "my.model", None, jobs.runner.folder(jobs.store.get(job_id)) / OUTPUT_FOLDER)
    assert serve_finished(outside, finished) is None and "my_model" not in outside.names

    # deleting a job stops serving its model first (its files go); the other job's model stays
    jobs.on_delete(lambda output: unserve_deleted(served, output))
    assert jobs.delete(None, job_id) == ["my_model"]
    assert "my_model" not in served.names and f"my_model-{again}" in served.names
    restarted = manager()
    restarted.restore()
    assert "my_model" not in restarted.names and f"my_model-{again}" in restarted.names


@pytest.mark.slow  # metrics.py in its own process (tiny CLIP, tiny pipeline)
def test_a_score_job_reports_clip_score_against_the_base_and_cmmd_to_the_held_out_images(
        fake_jobs, tmp_path, tiny_pipeline, tiny_adapter, tiny_clip, shapes_dataset):
    source = lora_output(tmp_path, tiny_adapter, tiny_pipeline)
    jobs = fake_jobs(f'cp -r "{source}"/. "$(dirname "$2")/{OUTPUT_FOLDER}/"\n', pipeline=tiny_pipeline,
                     data=shapes_dataset, clip_model=str(tiny_clip))
    settings = {**tiny_settings(tiny_pipeline, shapes_dataset, 2), "validation_prompts": ["a red circle"]}
    held_out = f"validation_data_dir: {shapes_dataset}\n"
    job_id = jobs.start(None, "scored", "tiny-lora", settings, ADVANCED + held_out)
    with pytest.raises(JobError, match="only a training job that is done can be scored"):
        jobs.score(None, job_id)  # still queued or running
    wait_for(jobs, job_id, ENDED, timeout=60)
    score_id = jobs.score(None, job_id)
    with pytest.raises(JobError, match="a score job: only a training job"):
        jobs.score(None, score_id)
    status = wait_for(jobs, score_id, ENDED, timeout=600)
    report = jobs.status(None, score_id)["report"]
    assert status["state"] == "done" and status["kind"] == "score", jobs.status(None, score_id)["log_tail"]
    assert set(report["models"]) == {"base", "trained"} and report["cmmd"]
    base, trained = report["models"]["base"], report["models"]["trained"]
    assert math.isfinite(base["clip_score_mean"]) and {"mean", "ci95"} <= set(trained["difference_to_first"])
    # the random tiny CLIP's scores clamp at 0 (100 * max(cos, 0)); its embeddings tell the two models' images apart:
    # the adapter was applied, not the base scored twice
    assert {"value", "ci95"} <= set(trained["cmmd"]) and base["cmmd"]["value"] != trained["cmmd"]["value"]
    assert "path" not in trained and str(tmp_path) not in json.dumps(report)


# One device, two jobs (sdtune/jobs/sharing.py): generation while a job trains


def test_generation_waits_while_a_full_finetune_holds_a_24_gb_gpu_and_goes_on_otherwise(fake_jobs, tmp_path,
                                                                                        tiny_pipeline):
    from sdtune.app.service import RequestError, Service
    from sdtune.generation.core import GenerationSettings
    from sdtune.generation.registry import ModelRegistry, ModelSpec
    from sdtune.jobs.sharing import (
        FULL_FINETUNE_GIB,
        generation_gate,
        generation_refusal,
        running_recipes,
        served_pipelines,
    )

    registry = ModelRegistry([ModelSpec("stock", str(tiny_pipeline))], device="cpu", lazy=True)
    with_lora = [*registry.specs.values(), ModelSpec("stock-lora", str(tiny_pipeline), lora="adapter")]
    assert served_pipelines(with_lora) == 1  # a LoRA model shares its base's pipeline
    service = Service(registry, tmp_path / "app", tmp_path)
    settings = GenerationSettings(num_inference_steps=1, width=32, height=32)
    jobs = fake_jobs("sleep 60\n")
    full = jobs.start(None, "full", "tiny")  # configs/tiny.yaml: a full fine-tune
    assert jobs.store.get(full).state == "running"

    def on(device, gib):  # the app's gate as it would be on that device, with the served models of this registry
        return lambda: generation_refusal(running_recipes(jobs), device, gib, 1)

    service.device_gate = on("cuda", 24)
    with pytest.raises(RequestError, match=f"Training job {full} \\(full\\), a full fine-tune, is using the GPU: "
                                           f"its steps peak near {FULL_FINETUNE_GIB:.1f} GiB"):
        service.text2img("a red circle", "stock", 1, 1, settings)
    assert on("cuda", 80)() is None  # an 80 GB GPU holds both
    service.device_gate = generation_gate(jobs, registry)  # this app serves from the CPU: it never waits
    assert len(service.text2img("a red circle", "stock", 1, 1, settings).paths) == 1
    jobs.cancel(None, full)
    wait_for(jobs, full, ENDED, timeout=30)
    lora = jobs.start(None, "lora", "tiny-lora")
    assert jobs.store.get(lora).state == "running"
    assert on("cuda", 24)() is None  # a LoRA job trains beside the served pipelines
    assert on("cuda", 4)() is not None and "a LoRA" in on("cuda", 4)()
    jobs.cancel(None, lora)
    wait_for(jobs, lora, ENDED, timeout=30)
    assert on("cuda", 4)() is None  # no job running: nothing waits
