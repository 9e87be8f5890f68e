"""The training jobs' API as plain functions of a `TrainingJobs`: start, status, stop, cancel, resume, list, delete.
The app wires them (/train_start, /train_status, /train_stop, /train_resume, /train_list).

Ownership: with --auth every call names its user (`owner`), a job belongs to the user who started it, and another
user's jobs are as good as absent (no control, no status, not listed). Without --auth `owner` is None and the app's
one user has every job. Messages name jobs by id and recipes by name, never a server path.
"""

import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from sdtune.jobs.live import live_status
from sdtune.jobs.recipe import check_with_trainer, job_recipe, load_base_recipe, parse_advanced, sanitise_name
from sdtune.jobs.runner import (
    LOG_FILE,
    OUTPUT_FOLDER,
    RECIPE_FILE,
    REPOSITORY,
    Runner,
)
from sdtune.jobs.score import REPORT_FILE, score_plan, score_report, write_score_job
from sdtune.jobs.store import Job, JobError, JobStore
from sdtune.training.on_demand import REQUEST_FILES, leave_request, request_file

logger = logging.getLogger("sdtune.jobs.api")

STORE_FILE = "jobs.sqlite"
RECIPE_HEADER = "# A training job's recipe (sdtune/jobs); the command line: bash train.sh --config job.yaml\n"
MAX_WAITING = 20  # queued or running jobs at once: a request cannot fill the disk with job folders
CLIP_MODEL = "openai/clip-vit-base-patch16"  # metrics.py's default scorer
SCORE_IMAGES_PER_PROMPT = 4  # metrics.py's default: seeds per prompt


@dataclass(frozen=True)
class FinishedJob:
    """A training job that ended done, as its on_done listeners get it."""
    id: int
    name: str
    owner: str | None
    output: Path  # the trainer's output folder: a LoRA's weights (with training_config.yaml naming its base) or a
    # full fine-tune's pipeline folder


class TrainingJobs:
    """The queue of one jobs root (e.g. outputs/app/jobs): its store, its runner, and the roots jobs may read."""

    def __init__(self, jobs_root, data_root, model_roots, recipes_dir=REPOSITORY / "configs", auth: bool = False,
                 env: dict | None = None, on_done: Callable[[FinishedJob], None] | None = None,
                 clip_model: str = CLIP_MODEL):
        self.jobs_root = Path(jobs_root).resolve()
        self.jobs_root.mkdir(parents=True, exist_ok=True)
        self.data_root, self.model_roots = Path(data_root), [Path(root) for root in model_roots]
        self.recipes_dir, self.auth, self.clip_model = Path(recipes_dir), auth, clip_model
        self.store = JobStore(self.jobs_root / STORE_FILE)
        self._done_listeners: list[Callable[[FinishedJob], None]] = [on_done] if on_done else []
        self._delete_listeners: list[Callable[[Path], list[str]]] = []
        self.runner = Runner(self.store, self.jobs_root, env=env, on_end=self._ended)

    def on_done(self, listener: Callable[[FinishedJob], None]) -> None:
        """Call `listener(FinishedJob)` once for each training job that ends done (the app serves its model). Told
        by the runner of the app that sees the job end, outside the queue's lock."""
        self._done_listeners.append(listener)

    def on_delete(self, listener: "Callable[[Path], list[str]]") -> None:
        """Call `listener(output_folder)` before a job's files are deleted (the app stops serving the models it
        serves from there); it returns the names of what it let go, which `delete` returns."""
        self._delete_listeners.append(listener)

    def _ended(self, job: Job) -> None:
        if job.state != "done" or job.kind != "train":
            return
        finished = FinishedJob(job.id, job.name, job.owner, self.runner.folder(job) / OUTPUT_FOLDER)
        for listener in self._done_listeners:
            try:
                listener(finished)
            except Exception:  # one listener's failure (a model that will not load) must not silence the others
                logger.exception("Job %d (%s) is done, but a listener of its end failed.", job.id, job.name)

    def start(self, owner: str | None, name: str, recipe: str, settings: dict | None = None,
              advanced: str | None = None) -> int:
        """Queue a job from configs/RECIPE.yaml with the form's `settings` and the `advanced` YAML over it, checked
        by the trainer's parser first: a refusal raises JobError and nothing is queued. Returns the job's id."""
        values = job_recipe(load_base_recipe(self.recipes_dir, recipe), settings or {}, parse_advanced(advanced),
                            self.data_root, self.model_roots)
        values["seed"] = check_with_trainer(values).seed  # drawn now when not given: a resumed run keeps it
        name = sanitise_name(name)

        def write(folder: Path) -> None:
            (folder / OUTPUT_FOLDER).mkdir(parents=True)
            write_recipe(folder, {**values, "output_dir": str(folder / OUTPUT_FOLDER)})

        return self._queue(name, self._owner(owner), "train", write)

    def score(self, owner: str | None, job_id: int) -> int:
        """Queue a score job for a done training job: metrics.py's CLIP score of its base and its model on its
        validation prompts (and CMMD to its --validation_data_dir), in its own process, in the queue's order.
        Returns the score job's id; its status carries the report once written (sdtune/jobs/score.py)."""
        job = self._job(owner, job_id)
        if job.kind != "train" or job.state != "done":
            raise JobError(f"Job {job_id} is {job.state if job.kind == 'train' else 'a score job'}: only a training "
                           "job that is done can be scored.")
        plan = score_plan(job_id, read_recipe(self.runner.folder(job)), self.runner.folder(job) / OUTPUT_FOLDER)
        return self._queue(sanitise_name(f"score-{job.name}"), job.owner, "score",
                           lambda folder: write_score_job(folder, plan, self.clip_model, SCORE_IMAGES_PER_PROMPT))

    def _queue(self, name: str, owner: str | None, kind: str, write_files) -> int:
        """Add a job and `write_files(its folder)`, then tick; nothing stays of it when writing fails."""
        with self.runner.lock:  # the scheduler must not see the job before its files are written
            self._check_room()
            job = self.store.add(name, owner, lambda job_id: f"{job_id:05d}-{name}", kind=kind)
            folder = self.runner.folder(job)
            try:
                write_files(folder)
            except OSError:
                self.store.delete(job.id)
                shutil.rmtree(folder, ignore_errors=True)
                raise
        self.runner.tick()
        return job.id

    def status(self, owner: str | None, job_id: int) -> dict:
        """The job's record and its live view (step, speed, losses, latest grid, the log's last lines)."""
        job = self._job(owner, job_id)
        folder = self.runner.folder(job)
        recipe = read_recipe(folder)
        live = live_status(folder / LOG_FILE, folder / OUTPUT_FOLDER, recipe.get("max_train_steps"))
        live.log_tail = [redact(line, folder) for line in live.log_tail]
        pending = [what for what in REQUEST_FILES if request_file(folder / OUTPUT_FOLDER, what).exists()]
        report = score_report(folder / OUTPUT_FOLDER / REPORT_FILE) if job.kind == "score" else None
        return {**summary(job), **vars(live), "pending_requests": pending, "report": report}

    def request(self, owner: str | None, job_id: int, what: str) -> dict:
        """Save now ("save": a checkpoint-N at the next optimizer step) or Sample now ("sample": a validation grid
        there): a request file the running trainer answers and removes (sdtune/training/on_demand.py)."""
        job = self._job(owner, job_id)
        if what not in REQUEST_FILES:
            raise JobError(f"Request {what!r}: ask for 'save' (a checkpoint now) or 'sample' (a validation grid now).")
        if job.kind != "train" or job.state != "running":
            raise JobError(f"Job {job_id} is {job.state if job.kind == 'train' else 'a score job'}: Save now and "
                           "Sample now reach a running training job only.")
        folder = self.runner.folder(job)
        recipe = read_recipe(folder)
        if what == "sample" and not recipe.get("validation_prompts") and not (
                recipe.get("validation_split") or recipe.get("validation_data_dir")):
            raise JobError(f"Job {job_id} has no validation prompts and no validation loss: nothing to sample. "
                           "Give validation_prompts when starting a job.")
        leave_request(folder / OUTPUT_FOLDER, what)
        return {**summary(job), "requested": what}

    def list(self, owner: str | None) -> list[dict]:
        """The caller's jobs, oldest first."""
        return [summary(job) for job in self.store.list() if self._visible(owner, job)]

    def stop(self, owner: str | None, job_id: int) -> dict:
        """SIGTERM to the job's process group (a queued job is stopped before it starts); Resume continues."""
        self._job(owner, job_id)
        return summary(self.runner.stop(job_id))

    def cancel(self, owner: str | None, job_id: int) -> dict:
        """SIGKILL to the job's process group: it ends at once; checkpoints already written stay for Resume."""
        self._job(owner, job_id)
        return summary(self.runner.stop(job_id, kill=True))

    def resume(self, owner: str | None, job_id: int) -> dict:
        """Queue a stopped, interrupted or failed job again, to continue from its latest checkpoint."""
        job = self._job(owner, job_id)
        with self.runner.lock:
            if job.state not in ("stopped", "interrupted", "failed"):
                raise JobError(f"Job {job_id} is {job.state}: only a stopped, interrupted or failed job resumes.")
            folder = self.runner.folder(job)
            if job.kind == "train":  # a score job starts again from the beginning
                write_recipe(folder, {**read_recipe(folder), "resume_from_checkpoint": "latest"})
            job = self.store.transition(job_id, "queued", pid=None, started=None, ended=None, error=None,
                                        stop_requested=0)
        self.runner.tick()
        return summary(self.store.get(job_id))

    def delete(self, owner: str | None, job_id: int) -> "list[str]":  # quoted: the method list shadows the type
        """Remove a job that is not running, and its folder (checkpoints, outputs, log), after its on_delete
        listeners have let go of what they use there; returns what they let go of (models no longer served)."""
        job = self._job(owner, job_id)
        with self.runner.lock:
            if self.store.get(job_id).state == "running":
                raise JobError(f"Job {job_id} is running: stop or cancel it before deleting it.")
            folder = self.runner.folder(job).resolve()
            if folder.parent != self.jobs_root:  # never outside the jobs root, whatever the database says
                raise JobError(f"Job {job_id}'s folder is not in the jobs root; not deleting it.")
            released = [name for listener in self._delete_listeners for name in listener(folder / OUTPUT_FOLDER)]
            shutil.rmtree(folder, ignore_errors=True)
            self.store.delete(job_id)
        return released

    def _check_room(self) -> None:
        if len(self.store.list(["queued", "running"])) >= MAX_WAITING:
            raise JobError(f"{MAX_WAITING} jobs are already queued or running: wait for one to end, or stop one.")

    def _owner(self, owner: str | None) -> str | None:
        if self.auth and not owner:
            raise JobError("Sign in first: with --auth a job belongs to the user who starts it.")
        return owner if self.auth else None

    def _visible(self, owner: str | None, job: Job) -> bool:
        return not self.auth or job.owner == self._owner(owner)

    def _job(self, owner: str | None, job_id) -> Job:
        try:
            job_id = int(job_id)
        except (TypeError, ValueError):
            raise JobError(f"Job id {job_id!r}: a number from the job list.") from None
        job = self.store.get(job_id)
        if not self._visible(owner, job):
            raise JobError(f"No training job {job_id}: see the job list (/train_list) for the jobs there are.")
        return job


def summary(job: Job) -> dict:
    """A job's record as the API shows it (no pid, no folder)."""
    return {"id": job.id, "name": job.name, "kind": job.kind, "owner": job.owner, "state": job.state,
            "created": job.created, "started": job.started, "ended": job.ended, "error": job.error,
            "stop_requested": job.stop_requested}


def write_recipe(folder: Path, values: dict) -> None:
    """JOB/job.yaml, written whole under a temporary name and renamed, so a launch never reads half of it."""
    temporary = folder / f"{RECIPE_FILE}.tmp"
    temporary.write_text(RECIPE_HEADER + yaml.safe_dump(values, sort_keys=False))
    temporary.replace(folder / RECIPE_FILE)


def read_recipe(folder: Path) -> dict:
    try:
        return yaml.safe_load((folder / RECIPE_FILE).read_text()) or {}
    except FileNotFoundError:
        return {}


# the folders of an absolute path left after that (a base model under a root, the Python environment): a '/' not
# after a word, '.', ':' or '~' (not JOB/..., ./..., 3/5, it/s or a URL), up to the path's last '/'
OTHER_FOLDERS = re.compile(r"(?<![\w.:~-])/[^\s'\"():,;]*/")


def redact(text: str, folder: Path) -> str:
    """A log line without the server's paths: the job's folder reads JOB, the repository '.', and any other absolute
    path keeps its last part only ('…/diffusion_pytorch_model.safetensors')."""
    return OTHER_FOLDERS.sub("…/", text.replace(str(folder), "JOB").replace(str(REPOSITORY), "."))


def wait_for(jobs: TrainingJobs, job_id: int, states, timeout: float) -> dict:
    """Tick the scheduler until the job is in one of `states` (a script's or a test's wait, without the thread)."""
    deadline = time.monotonic() + timeout
    while (job := jobs.store.get(job_id)).state not in states:
        if time.monotonic() > deadline:
            raise JobError(f"Job {job_id} still {job.state} after {timeout:.0f} s.")
        time.sleep(0.5)
        jobs.runner.tick()
    return summary(job)
