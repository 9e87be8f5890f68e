"""The training queue, kept in SQLite (the standard library's sqlite3) so that it outlives the app: one row a job.

A job's life: queued -> running -> done | failed | stopped | interrupted; stopped, interrupted and failed jobs go
back to queued when resumed, and a queued job can be stopped before it starts. Every change goes through
`transition`, which refuses any other move with a message naming both states. The file is in WAL mode: the app's
scheduler thread and its request handlers read while one of them writes.
"""

import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import SdtuneError

STATES = ("queued", "running", "stopped", "interrupted", "failed", "done")
TRANSITIONS = {
    "queued": {"running", "stopped", "failed"},  # failed: the trainer could not be launched
    "running": {"done", "failed", "stopped", "interrupted"},
    "stopped": {"queued"},
    "interrupted": {"queued"},
    "failed": {"queued"},
    "done": set(),
}
ENDED = {"done", "failed", "stopped", "interrupted"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    owner TEXT,                           -- the --auth user who started it; NULL without --auth
    state TEXT NOT NULL,
    created REAL NOT NULL,                -- Unix times
    started REAL,
    ended REAL,
    pid INTEGER,                          -- the launched process, leader of its own process group
    folder TEXT NOT NULL,                 -- the job's folder, relative to the jobs root
    error TEXT,
    stop_requested INTEGER NOT NULL DEFAULT 0, -- Stop or Cancel was asked: its end is "stopped", not "interrupted"
    kind TEXT NOT NULL DEFAULT 'train'    -- what the job runs: KINDS
)
"""
KINDS = ("train", "score")  # the trainer (train.sh), or metrics.py scoring a trained job's model against its base


class JobError(SdtuneError):
    """A job request that cannot be done: an unknown job, a move its state does not allow, a bad setting."""


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    owner: str | None
    state: str
    created: float
    started: float | None
    ended: float | None
    pid: int | None
    folder: str
    error: str | None
    stop_requested: bool
    kind: str = "train"


class JobStore:
    """The jobs of one jobs root, in `path` (e.g. outputs/app/jobs/jobs.sqlite)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(SCHEMA)
            columns = {row["name"] for row in connection.execute("PRAGMA table_info(jobs)")}
            if "kind" not in columns:  # a queue from before score jobs: all of its jobs train
                connection.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'train'")

    @contextmanager
    def _connect(self):
        """A connection per call, closed after it: the scheduler thread and Gradio's worker threads each use their
        own. Autocommit; the multi-statement changes open their own transaction."""
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        connection.row_factory = sqlite3.Row
        try:
            yield connection
        finally:
            connection.close()

    def add(self, name: str, owner: str | None, folder_for, kind: str = "train") -> Job:
        """A new queued job; `folder_for(job_id)` names its folder (the id is only known once the row exists)."""
        if kind not in KINDS:
            raise ValueError(f"not a job kind: {kind!r}")  # a programming error, not a user's
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            cursor = connection.execute("INSERT INTO jobs (name, owner, state, created, folder, kind) "
                                        "VALUES (?, ?, ?, ?, ?, ?)", (name, owner, "queued", time.time(), "", kind))
            job_id = cursor.lastrowid
            connection.execute("UPDATE jobs SET folder = ? WHERE id = ?", (folder_for(job_id), job_id))
            connection.execute("COMMIT")
        return self.get(job_id)

    def get(self, job_id: int) -> Job:
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobError(f"No training job {job_id}: see the job list (/train_list) for the jobs there are.")
        return _job(row)

    def list(self, states=STATES) -> list[Job]:
        """Jobs in these states, oldest first (the queue's order)."""
        marks = ", ".join("?" for _ in states)
        with self._connect() as connection:
            rows = connection.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", tuple(states))
            return [_job(row) for row in rows.fetchall()]

    def transition(self, job_id: int, new_state: str, **fields) -> Job:
        """Move a job to `new_state` and set `fields` (started, ended, pid, error, stop_requested) in one
        transaction; refuse a move the life cycle does not have."""
        if new_state not in STATES:
            raise JobError(f"Unknown job state {new_state!r}: one of {', '.join(STATES)}.")
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                row = connection.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    raise JobError(f"No training job {job_id}: see the job list (/train_list) for the jobs there are.")
                if new_state not in TRANSITIONS[row["state"]]:
                    raise JobError(f"Job {job_id} is {row['state']}: it cannot become {new_state} "
                                   f"({_allowed(row['state'])}).")
                _update(connection, job_id, state=new_state, **fields)
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        return self.get(job_id)

    def mark_stop_requested(self, job_id: int) -> None:
        with self._connect() as connection:
            _update(connection, job_id, stop_requested=1)

    def delete(self, job_id: int) -> None:
        with self._connect() as connection:
            connection.execute("DELETE FROM jobs WHERE id = ?", (job_id,))


FIELDS = {"state", "started", "ended", "pid", "error", "stop_requested"}


def _update(connection: sqlite3.Connection, job_id: int, **fields) -> None:
    unknown = set(fields) - FIELDS
    if unknown:
        raise ValueError(f"not job fields: {sorted(unknown)}")  # a programming error, not a user's
    assignments = ", ".join(f"{name} = ?" for name in fields)
    connection.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))


def _allowed(state: str) -> str:
    targets = sorted(TRANSITIONS[state])
    return f"from {state} it can become {', '.join(targets)}" if targets else f"{state} is final"


def _job(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["stop_requested"] = bool(values["stop_requested"])
    return Job(**values)
