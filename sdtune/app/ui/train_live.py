"""The Train tab's job list, the live view of the chosen job and its controls. Everything shown is read from the
store and the files the trainer writes (TrainingJobs.status: the tails of its log and loss history, the newest
validation grid), so a page refreshing every few seconds costs the trainer nothing, and a browser that closes and
reopens finds its jobs where they are. Every call names the signed-in user: with --auth another user's jobs are not
listed and cannot be read or controlled.
"""

from pathlib import Path

import gradio as gr
import pandas as pd

from sdtune.app.ui.compare_tab import COMPARE_TAB
from sdtune.errors import SdtuneError
from sdtune.jobs.api import read_recipe

LIST_HEADERS = ["Job", "Name", "State", "Error"]
LOSS_COLUMNS = ["step", "loss"]
CONTROLS = {"stop": "stopping: it saves a checkpoint at its current step and ends",
            "cancel": "cancelled: it ends at once, its checkpoints kept",
            "resume": "queued again: it continues from its latest checkpoint"}
# methods another part of the jobs API adds (issue 25); until it has them the buttons say so
LATER = {"save": "Save now", "sample": "Sample now"}


class TrainLive:
    """The live view's and the controls' handlers, for one TrainingJobs and the app's served models."""

    def __init__(self, jobs, registry):
        self.jobs, self.registry = jobs, registry

    def job_list(self, selected, request: gr.Request):
        """The caller's jobs as a table and as the job picker's choices; with none chosen, the newest."""
        jobs = self.jobs.list(_user(request))
        rows = [[job["id"], job["name"], job["state"], job["error"] or ""] for job in jobs]
        choices = [(f"{job['id']}: {job['name']} ({job['state']})", job["id"]) for job in jobs]
        ids = [job["id"] for job in jobs]
        chosen = _job_id(selected) if _job_id(selected) in ids else (ids[-1] if ids else None)
        return rows, gr.update(choices=choices, value=chosen)

    def view(self, selected, shown, request: gr.Request):
        """The chosen job's state line, training and validation loss series, validation grids and log's last lines,
        each left as it is (gr.skip()) when it has not changed since this page's last view (`shown`, the State this
        returns last): a plot sent again is drawn again, every few seconds, for each open page."""
        job_id = _job_id(selected)
        values = self._read(job_id, _user(request))
        now = [_fingerprint(job_id, value) for value in values]
        before = shown if isinstance(shown, list) and len(shown) == len(now) else [None] * len(now)
        return (*(gr.skip() if key == seen else value for value, key, seen in zip(values, now, before)), now)

    def _read(self, job_id: int | None, owner: str | None) -> tuple:
        if job_id is None:
            return "No job chosen.", loss_frame([]), loss_frame([]), [], ""
        try:
            status = self.jobs.status(owner, job_id)
        except SdtuneError as error:
            return str(error), loss_frame([]), loss_frame([]), [], ""
        return (state_line(status), loss_frame(status["train_loss"]), loss_frame(status["validation_loss"]),
                grid_gallery(status["grids"]), "\n".join(status["log_tail"]))

    def control(self, action: str):
        """The handler of Stop, Cancel or Resume."""
        def handler(selected, request: gr.Request):
            return self._act(selected, request, lambda owner, job_id: getattr(self.jobs, action)(owner, job_id),
                             CONTROLS[action])
        handler.__name__ = f"{action}_chosen_job"  # not train_{action}: the API endpoint has that name
        return handler

    def ask_delete(self, selected, request: gr.Request):
        """Delete's first step: the confirmation, naming the job; nothing is deleted yet."""
        job_id = _job_id(selected)
        if job_id is None:
            return gr.update(visible=False), None, "Choose a job first."
        try:
            name = self.jobs.status(_user(request), job_id)["name"]
        except SdtuneError as error:
            return gr.update(visible=False), None, str(error)
        return (gr.update(visible=True), job_id,
                f"Delete job {job_id} ({name}) with its checkpoints, samples and log? This cannot be undone.")

    def confirm_delete(self, pending, request: gr.Request):
        """Delete's second step: the job confirmed (kept from the first step, whatever is chosen since)."""
        if pending is None:
            return gr.update(visible=False), None, "Nothing to delete: press Delete first."
        try:
            released = self.jobs.delete(_user(request), pending)
        except SdtuneError as error:
            return gr.update(visible=False), None, str(error)
        served = f"; no longer served: {', '.join(released)}" if released else ""
        return gr.update(visible=False), None, f"Job {pending} deleted{served}."

    def keep(self):
        return gr.update(visible=False), None, "Nothing deleted."

    def request_now(self, what: str):
        """The handler of Save now ("save": a checkpoint) or Sample now ("sample": a validation grid), at the next
        step."""
        def handler(selected, request: gr.Request):
            return self._act(selected, request, lambda owner, job_id: self.jobs.request(owner, job_id, what),
                             f"{LATER[what].lower()} asked: at its next step")
        handler.__name__ = f"{what}_chosen_job_now"
        return handler

    def score(self, selected, request: gr.Request):
        """Score: CLIP score against the base on the job's validation prompts, queued as a job of its own."""
        job_id = _job_id(selected)
        try:
            score_job = self.jobs.score(_user(request), job_id)
        except SdtuneError as error:
            return str(error)
        return f"Job {job_id}: scoring queued as job {score_job}."

    def compare_with_base(self, selected, request: gr.Request):
        """The Compare tab, opened on a done job's base and its served model, the job's first validation prompt and
        seed; the tabs, prompt, models and seed, and a message."""
        job_id = _job_id(selected)
        try:
            if job_id is None:
                raise SdtuneError("Choose a job first.")
            status = self.jobs.status(_user(request), job_id)
            if status["state"] != "done":
                raise SdtuneError(f"Job {job_id} is {status['state']}: Compare with base opens on a done job.")
            recipe = read_recipe(self.jobs.runner.folder(self.jobs.store.get(job_id)))
            models = [self._served_base(recipe.get("pretrained_model_name_or_path")), self._served(status["name"])]
        except SdtuneError as error:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), str(error)
        prompts = recipe.get("validation_prompts") or [""]
        seed = recipe.get("seed") if recipe.get("seed") is not None else -1
        return gr.Tabs(selected=COMPARE_TAB), prompts[0], models, seed, f"Job {job_id} against its base: Compare."

    def _served_base(self, path) -> str:
        """The served name of the full model at the job's base path."""
        wanted = Path(str(path)).resolve() if path else None
        for name, spec in self.registry.specs.items():
            if not spec.lora and (spec.path == path or Path(spec.path).resolve() == wanted):
                return name
        raise SdtuneError("The job's base is not served: add it in the Models tab, then compare.")

    def _served(self, name: str) -> str:
        if name not in self.registry.specs:
            raise SdtuneError(f"The model {name!r} is not served yet: it joins the model list when its job ends.")
        return name

    def _act(self, selected, request, call, done: str) -> str:
        job_id = _job_id(selected)
        if job_id is None:
            return "Choose a job first."
        try:
            call(_user(request), job_id)
        except SdtuneError as error:
            return str(error)
        return f"Job {job_id}: {done}."


def state_line(status: dict) -> str:
    """'**running**: step 30 / 100, 1.20 steps/s, about 58 s left', and the job's error when it has one."""
    line = f"Job {status['id']} ({status['name']}): **{status['state']}**"
    if status["total_steps"]:
        line += f", step {status['step']} / {status['total_steps']}"
    if status["steps_per_second"]:
        line += f", {status['steps_per_second']:.2f} steps/s"
    if status["seconds_left"] is not None and status["state"] == "running":
        line += f", about {_duration(status['seconds_left'])} left"
    return line + (f"\n\n{status['error']}" if status["error"] else "")


def _fingerprint(job_id: int | None, value):
    """What identifies a shown value: a loss series by its length and last point (it only grows, and a resumed run
    rewrites its tail from the checkpoint's step), anything else by itself; each with the job it belongs to."""
    if isinstance(value, pd.DataFrame):
        return job_id, len(value), value.tail(1).values.tolist()
    return job_id, repr(value)  # a gallery's list too


def grid_gallery(grids: list[Path]) -> list[tuple[str, str]]:
    """The validation grids as the gallery shows them: newest first (the one opened large), each captioned with its
    step (the trainer names them step-000500.png)."""
    return [(str(grid), _step_caption(grid)) for grid in reversed(grids)]


def _step_caption(grid: Path) -> str:
    digits = grid.stem.removeprefix("step-")
    return f"step {int(digits)}" if digits.isdigit() else grid.stem


def loss_frame(series) -> pd.DataFrame:
    return pd.DataFrame([list(point) for point in series], columns=LOSS_COLUMNS)


def _duration(seconds: float) -> str:
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours} h {minute:02d} min" if hours else f"{minute} min {second:02d} s" if minute else f"{second} s"


def _job_id(selected) -> int | None:
    try:
        return int(selected)
    except (TypeError, ValueError):
        return None


def _user(request) -> str | None:
    return getattr(request, "username", None)
