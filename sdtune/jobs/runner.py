"""Runs the queue: one job trains at a time, in its own process, detached from the app.

A job runs `bash train.sh --config JOB/job.yaml` (accelerate launch train_text_to_image.py with the job's recipe, the
command line's own path; a score job runs metrics.py, sdtune/jobs/score.py) in a new session, so that it is the leader
of its own process group, the app dying does not take it along, and Stop and Cancel reach accelerate and the trainer it
spawns at once. A small bash wrapper records the exit status in JOB/exit_status when the command ends (it only waits: a
trapped TERM lets it outlive a Stop), because the app that started a job may not be the one that sees it end. On SIGTERM
the trainer saves a checkpoint at the end of its step, leaves output/training_stopped.json and exits 0
(sdtune/training/stopping.py): the job is stopped.

The store is the truth: a new Runner (the app restarted) finds each running job again by its process group, whose
members are checked against /proc/PID/cmdline so that a recycled pid is not taken for the trainer; a job runs while
any process of its group does. `tick` does one round of the scheduler; the
app calls it from a thread every few seconds and after each request that changes the queue.
"""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from sdtune.jobs.store import Job, JobError, JobStore
from sdtune.training.stopping import STOPPED_FILE

logger = logging.getLogger("sdtune.jobs.runner")

REPOSITORY = Path(__file__).resolve().parents[2]
RECIPE_FILE = "job.yaml"
LOG_FILE = "job.log"
OUTPUT_FOLDER = "output"
EXIT_STATUS_FILE = "exit_status"
# `trap : TERM`: a handler, not an ignored signal, so the trainer still gets SIGTERM's default; the wrapper goes on
# waiting and then writes the status under a temporary name, renamed when complete
WRAPPER = 'trap : TERM; "${@:2}"; status=$?; echo $status > "$1.tmp"; mv "$1.tmp" "$1"'
# A score job (TrainingJobs.score) runs metrics.py with the flags in its SCORE_FILE ({"argv": [...]}); their
# --models is the job's SCORE_MODELS_FILE, the path that marks the job's processes as the recipe marks a trainer's
SCORE_FILE = "score.yaml"
SCORE_MODELS_FILE = "models.yaml"


class Runner:
    """Starts, watches and signals the jobs of `store`, whose folders are under `jobs_root`."""

    def __init__(self, store: JobStore, jobs_root, env: dict | None = None, train_script: Path | None = None,
                 on_end: Callable[[Job], None] | None = None):
        self.store, self.jobs_root = store, Path(jobs_root).resolve()
        self.on_end = on_end  # told of each job this runner sees end, once, outside the lock (it may load a model)
        self.env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")  # the log shows lines as they come
        self.train_script = Path(train_script or REPOSITORY / "train.sh")
        self._children: dict[int, subprocess.Popen] = {}  # the processes this runner started, reaped when they end
        self.lock = threading.RLock()  # held by each round and each change of the queue
        self._thread = None
        self._stopping = threading.Event()

    def folder(self, job: Job) -> Path:
        return self.jobs_root / job.folder

    def tick(self) -> None:
        """One round: end the running jobs whose process is gone, then start the oldest queued job if none runs."""
        with self.lock:
            ended, running = [], []
            for job in self.store.list(["running"]):
                (ended if self._finish_if_ended(job) else running).append(job.id)
            queued = self.store.list(["queued"]) if not running else []
            if queued:
                self._launch(queued[0])
        for job_id in ended:
            self._tell_end(job_id)

    def _tell_end(self, job_id: int) -> None:
        """on_end(job) for a job that just ended: a failing listener is logged and the scheduler goes on."""
        if self.on_end is None:
            return
        try:
            self.on_end(self.store.get(job_id))
        except Exception:
            logger.exception("Job %d ended, but what follows its end failed.", job_id)

    def _launch(self, job: Job) -> None:
        folder = self.folder(job)
        stale_files = (EXIT_STATUS_FILE, f"{EXIT_STATUS_FILE}.tmp", f"{OUTPUT_FOLDER}/{STOPPED_FILE}")
        for stale in (folder / name for name in stale_files):
            stale.unlink(missing_ok=True)
        try:
            command, shown = self._command(job)
            command = ["bash", "-c", WRAPPER, "sdtune-job", str(folder / EXIT_STATUS_FILE), *command]
            with open(folder / LOG_FILE, "ab") as log:
                log.write(f"$ {shown}  (job {job.id}, {time.ctime()})\n".encode())
                log.flush()
                process = subprocess.Popen(command, cwd=self.train_script.parent, env=self.env,
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as error:
            self.store.transition(job.id, "failed", ended=time.time(), error=f"The job could not start: {error}")
            return
        self._children[process.pid] = process
        self.store.transition(job.id, "running", started=time.time(), pid=process.pid, ended=None, error=None)
        logger.info("Job %d (%s) started: process group %d.", job.id, job.name, process.pid)

    def _command(self, job: Job) -> tuple[list[str], str]:
        """The job's command, and how its log shows it (no server path)."""
        folder = self.folder(job)
        if job.kind == "score":
            argv = [str(value) for value in yaml.safe_load((folder / SCORE_FILE).read_text())["argv"]]
            return [sys.executable, str(REPOSITORY / "metrics.py"), *argv], f"python metrics.py (scoring, {SCORE_FILE})"
        return ["bash", str(self.train_script), "--config", str(folder / RECIPE_FILE)], \
            f"bash train.sh --config {RECIPE_FILE}"

    def marker(self, job: Job) -> Path:
        """The file whose path is on the command line of each of the job's processes."""
        return self.folder(job) / (SCORE_MODELS_FILE if job.kind == "score" else RECIPE_FILE)

    def _finish_if_ended(self, job: Job) -> bool:
        """Record the end of a running job whose process is gone; False while it runs."""
        child = self._children.get(job.pid)
        if child is not None:
            child.poll()  # reaps the wrapper if it ended, so that it no longer counts
        if job_processes(job.pid, self.marker(job)):
            return False
        self._children.pop(job.pid, None)
        state, error = self._outcome(job)
        self.store.transition(job.id, state, ended=time.time(), error=error)
        logger.info("Job %d (%s) %s.", job.id, job.name, state)
        return True

    def _outcome(self, job: Job) -> tuple[str, str | None]:
        status_file = self.folder(job) / EXIT_STATUS_FILE
        status = int(status_file.read_text()) if status_file.is_file() else None
        if (self.folder(job) / OUTPUT_FOLDER / STOPPED_FILE).is_file() or job.stop_requested and status != 0:
            return "stopped", None  # the trainer's clean stop (a checkpoint at its last step), or a stop's kill
        if status == 0:
            return "done", None
        if status is None:  # the wrapper died without writing it: the machine or the app's session went down
            return "interrupted", "The trainer's process ended without an exit status (killed); Resume continues " \
                                  "from its last checkpoint."
        return "failed", f"The trainer exited with status {status}; the log's last lines say why."

    def stop(self, job_id: int, kill: bool = False) -> Job:
        """Stop (SIGTERM) or Cancel (SIGKILL) a job: a queued one is stopped at once, a running one's process group
        gets the signal and the next tick records its end. Checkpoints already written stay."""
        with self.lock:
            job = self.store.get(job_id)
            if job.state == "queued":
                return self.store.transition(job_id, "stopped", ended=time.time(), stop_requested=1)
            if job.state != "running":
                raise JobError(f"Job {job_id} is {job.state}: only a queued or running job can be stopped.")
            self.store.mark_stop_requested(job_id)
            if job_processes(job.pid, self.marker(job)):
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.killpg(job.pid, signal.SIGKILL if kill else signal.SIGTERM)
            return self.store.get(job_id)

    def start_scheduler(self, interval: float = 2.0) -> None:
        """Tick every `interval` seconds in a daemon thread until `shutdown`."""
        def loop():
            while not self._stopping.wait(interval):
                try:
                    self.tick()
                except Exception:  # the scheduler must outlive a bad round (a locked database, a full disk)
                    logger.exception("The training scheduler's round failed; retrying.")

        self._thread = threading.Thread(target=loop, name="sdtune-jobs", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the scheduler thread; running jobs go on (a later Runner finds them again)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()


def job_processes(group: int | None, recipe: Path) -> list[int]:
    """The live processes of process group `group` that are this job's (their command line names its recipe): the
    wrapper, accelerate launch and the trainer. The trainer can outlive the others (after a Stop, accelerate's
    launcher dies at once while the trainer saves its checkpoint), so a job runs while any of them does. A recycled
    pid or group id does not match the recipe; a zombie (ended, not yet reaped) does not count."""
    if not group:
        return []
    found, mark = [], str(recipe).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # after the command's closing parenthesis: state, ppid, pgrp, ...
            state, _, pgrp = (entry / "stat").read_text().rpartition(")")[2].split()[:3]
            if int(pgrp) == group and state != "Z" and mark in (entry / "cmdline").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue  # it ended while being read
    return found
