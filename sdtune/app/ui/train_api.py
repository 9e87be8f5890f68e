"""The training jobs' API endpoints (gradio_app.py --train): /train_start, /train_status, /train_stop, /train_resume,
/train_list, /train_delete, /train_save_now, /train_sample_now and /train_score, each a sdtune/jobs/api.py call made
as the signed-in user (--auth), so that one user's jobs are out of another's reach (README, "Training jobs").

gr.api endpoints take their types from the functions' hints (Gradio 6). A refused request becomes a gr.Error with the
job module's message, which names no server path; the status names the latest validation grid by its file name only.
"""

import gradio as gr

from sdtune.jobs.api import TrainingJobs
from sdtune.jobs.store import JobError


def train_endpoints(jobs: TrainingJobs) -> None:
    """Register the endpoints in the Blocks being built; the calls are quick (the trainer runs in its own process),
    so they skip the generation queue."""

    def train_start(name: str, recipe: str, settings: dict | None = None, advanced: str = "",
                    request: gr.Request = None) -> int:
        """Queue a training job from configs/RECIPE.yaml with the form settings and advanced trainer flags (YAML);
        returns its id."""
        return _answer(jobs.start, _user(request), name, recipe, settings or {}, advanced)

    def train_status(job_id: int, request: gr.Request = None) -> dict:
        """A job's state, step and total, steps/s, time left, loss series, validation grids (the newest and the
        last few by file name) and log lines."""
        status = _answer(jobs.status, _user(request), job_id)
        grid = status.pop("latest_grid")
        return {**status, "latest_grid": grid.name if grid is not None else None,
                "grids": [path.name for path in status.pop("grids")]}  # file names only: no server path

    def train_stop(job_id: int, cancel: bool = False, request: gr.Request = None) -> dict:
        """Stop a job (SIGTERM: a checkpoint at the current step), or with cancel=True end it at once (SIGKILL)."""
        return _answer(jobs.cancel if cancel else jobs.stop, _user(request), job_id)

    def train_resume(job_id: int, request: gr.Request = None) -> dict:
        """Queue a stopped, interrupted or failed job again; it continues from its latest checkpoint."""
        return _answer(jobs.resume, _user(request), job_id)

    def train_list(request: gr.Request = None) -> list:
        """The caller's jobs, oldest first."""
        return _answer(jobs.list, _user(request))

    def train_save_now(job_id: int, request: gr.Request = None) -> dict:
        """Save now: a running job writes checkpoint-N at its next optimizer step."""
        return _answer(jobs.request, _user(request), job_id, "save")

    def train_sample_now(job_id: int, request: gr.Request = None) -> dict:
        """Sample now: a running job renders a validation grid at its next optimizer step."""
        return _answer(jobs.request, _user(request), job_id, "sample")

    def train_delete(job_id: int, request: gr.Request = None) -> list:
        """Delete a job that is not running, with its folder (checkpoints, samples, log); the models served from it
        are no longer served. Returns their names. There is no undo."""
        return _answer(jobs.delete, _user(request), job_id)

    def train_score(job_id: int, request: gr.Request = None) -> int:
        """Queue a score job for a done training job (CLIP score against its base on its validation prompts, CMMD to
        its held-out images); returns its id, whose /train_status carries the report."""
        return _answer(jobs.score, _user(request), job_id)

    for endpoint in (train_start, train_status, train_stop, train_resume, train_list, train_delete, train_save_now,
                     train_sample_now, train_score):
        gr.api(endpoint, api_name=endpoint.__name__, queue=False)


def _user(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None)


def _answer(call, *arguments):
    try:
        return call(*arguments)
    except JobError as error:
        raise gr.Error(str(error)) from None
