"""The Train tab (gradio_app.py --train): its handlers driven as functions on a Blocks built with a TrainingJobs on
temporary roots, whose train.sh is a stand-in (no training): the recipe fills the form, refusals show in the page and
queue nothing, uploads are capped and saved with their captions, the live view reads a job's files, Delete asks
first, and one user's controls never reach another's jobs."""

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import yaml
from helpers import png_header_only, subprocess_env
from PIL import Image

from sdtune.app.service import Service
from sdtune.app.ui.blocks import build_ui
from sdtune.app.ui.compare_tab import COMPARE_TAB
from sdtune.app.ui.train_form import FILLED, FORM_FIELDS, RECIPE_BASE
from sdtune.generation.registry import ModelRegistry, ModelSpec
from sdtune.jobs import uploads
from sdtune.jobs.api import TrainingJobs, read_recipe, wait_for
from sdtune.jobs.runner import LOG_FILE, OUTPUT_FOLDER

ENDED = ("done", "failed", "stopped", "interrupted")
ALICE, BOB = SimpleNamespace(username="alice"), SimpleNamespace(username="bob")


def image(path, colour="red", size=(40, 32)):
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def roots(tmp_path):
    data, models = tmp_path / "data", tmp_path / "models"
    (data / "shapes").mkdir(parents=True)
    for index in range(2):
        image(data / "shapes" / f"{index}.png")
    (models / "base").mkdir(parents=True)
    return SimpleNamespace(tmp=tmp_path, data=data, models=models)


def make_tab(roots, auth=False, script="exit 0\n", served=()):
    """The app's Blocks with a Train tab on a TrainingJobs whose train.sh is `script`; returns the tab's form and live
    handlers (found by their names among the Blocks' events), the jobs and the Blocks."""
    jobs = TrainingJobs(roots.tmp / "jobs", roots.data, [roots.models], auth=auth, env=subprocess_env(threads=1))
    fake = roots.tmp / "bin" / "train.sh"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(script)
    jobs.runner.train_script = fake
    specs = [ModelSpec("base", str(roots.models / "base")), *(ModelSpec(name, str(roots.models / "base"))
                                                              for name in served)]
    service = Service(ModelRegistry(specs, device="cpu", lazy=True), roots.tmp / "outputs", roots.tmp / "inputs",
                      models_root=roots.models)
    demo = build_ui(service, jobs)
    handlers = {getattr(fn.fn, "__name__", ""): fn for fn in demo.fns.values()}
    return SimpleNamespace(form=handlers["start"].fn.__self__, live=handlers["view"].fn.__self__, jobs=jobs,
                           demo=demo, events=handlers, service=service)


def form(**overrides) -> list:
    """The form's values in its controls' order: configs/tiny-lora.yaml on the data root's shapes, 4 steps."""
    values = dict(name="shapes job", recipe="tiny-lora", method="lora", instance_prompt="", class_prompt="",
                  base="base", source="folder", folder="shapes", dataset="", files=None, captions=None,
                  max_train_steps=4, learning_rate=5e-4, lora_rank=4, resolution=32, train_batch_size=2,
                  checkpointing_steps=2, validation_prompts="a red circle\na blue square", validation_epochs=1,
                  validation_steps=0, seed=7, advanced="")
    values.update(overrides)
    return [values[name] for name in FORM_FIELDS]


def test_the_train_tab_is_there_only_with_jobs(roots):
    def tabs(demo):
        return [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]

    service = Service(ModelRegistry([ModelSpec("base", str(roots.models / "base"))], device="cpu", lazy=True),
                      roots.tmp / "outputs", roots.tmp / "inputs")
    assert "Train" not in tabs(build_ui(service))
    demo = make_tab(roots).demo
    assert "Train" in tabs(demo)
    # the tab's own events take no name of the training API's endpoints (Gradio would rename the endpoint: /x_1)
    endpoints = {"train_start", "train_status", "train_stop", "train_resume", "train_list", "train_delete",
                 "train_save_now", "train_sample_now", "train_score"}
    assert {f"/{name}" for name in endpoints} <= set(demo.get_api_info()["named_endpoints"])


def test_a_recipe_fills_the_settings_people_change(roots):
    tab = make_tab(roots)
    recipe = yaml.safe_load(open("configs/tiny-lora.yaml"))
    filled = dict(zip([*FILLED, "method"], tab.form.recipe_values("tiny-lora")))
    assert filled == dict(max_train_steps=400, learning_rate=5e-4, lora_rank=16, resolution=64, train_batch_size=8,
                          checkpointing_steps=200, validation_prompts="\n".join(recipe["validation_prompts"]),
                          validation_epochs=1000, validation_steps=0, seed=1234, method="lora")
    assert tab.form.recipe_values("tiny")[-1] == "full"  # configs/tiny.yaml: no rank, a full fine-tune
    assert {"tiny", "tiny-lora"} <= set(tab.form.recipes())
    outputs = [block.label for block in tab.events["recipe_values"].outputs]  # the values land in their fields
    assert outputs == ["Steps", "Learning rate", "LoRA rank", "Resolution", "Batch", "Checkpoint every (steps)",
                       "Validation prompts (one a line)", "Validate every (epochs)",
                       "...or every (steps; 0: by epochs)", "Seed (-1: drawn)", "Method"]


def test_the_base_picker_follows_models_added_and_removed_while_serving(roots, tiny_pipeline):
    from sdtune.app.ui.models_tab import PickerRefresh

    tab = make_tab(roots)
    picker = next(block for block in tab.demo.blocks.values() if getattr(block, "label", None) == "Base model")
    shutil.copytree(tiny_pipeline, roots.models / "tuned")
    tab.service.models.add("tuned", "tuned")
    assert [value for _, value in picker.choices] == [RECIPE_BASE, "base", "tuned"]  # what a new page shows
    refresh = next(fn for fn in tab.demo.fns.values() if isinstance(fn.fn, PickerRefresh))
    assert picker in refresh.outputs  # an open page's timer updates it too
    tab.service.models.remove("tuned")
    assert [value for _, value in picker.choices] == [RECIPE_BASE, "base"]


def test_start_queues_the_forms_job_with_its_settings(roots):
    tab = make_tab(roots)
    message, job_id = tab.form.start(None, *form())
    assert message == f"Job {job_id} queued."
    recipe = read_recipe(tab.jobs.runner.folder(tab.jobs.store.get(job_id)))
    assert (recipe["train_data_dir"], recipe["pretrained_model_name_or_path"]) == (
        str(roots.data / "shapes"), str(roots.models / "base"))
    assert {key: recipe[key] for key in ("max_train_steps", "lora_rank", "resolution", "seed", "validation_prompts")
            } == dict(max_train_steps=4, lora_rank=4, resolution=32, seed=7,
                      validation_prompts=["a red circle", "a blue square"])
    assert recipe["validation_steps"] is None and recipe["instance_prompt"] is None  # the recipe's own unset
    _, full = tab.form.start(None, *form(method="full"))
    assert read_recipe(tab.jobs.runner.folder(tab.jobs.store.get(full)))["lora_rank"] == 0


def test_a_bad_advanced_flag_is_refused_with_the_trainers_message_and_nothing_is_queued(roots):
    tab = make_tab(roots)
    for advanced, expected in [("lr_scheduler: sideways", "argument --lr_scheduler: invalid choice: 'sideways'"),
                               ("snr_gama: 5", "Unknown trainer flags ['snr_gama']"),
                               ("output_dir: /tmp/elsewhere", "output_dir cannot be set"),
                               ("class_data_dir: /etc", "class_data_dir '/etc': outside the folders jobs may read"),
                               ("instance_data_dir: /etc", "instance_data_dir '/etc': outside")]:
        message, job = tab.form.start(None, *form(advanced=advanced))
        assert message.startswith("**Not started.**") and expected in message and job == gr.skip()
    message, _ = tab.form.start(None, *form(source="upload", files=[str(roots.data / "shapes" / "0.png")],
                                            advanced="lr_scheduler: sideways"))
    assert "invalid choice" in message
    assert tab.jobs.list(None) == [] and not any((roots.data / uploads.UPLOADS_FOLDER).iterdir())  # upload dropped


def test_subject_training_sets_the_instance_and_class_flags_and_a_hub_dataset_replaces_the_folder(roots):
    tab = make_tab(roots)
    _, job_id = tab.form.start(None, *form(method="subject", instance_prompt="a photo of sks shape",
                                           class_prompt="a photo of a shape"))
    recipe = read_recipe(tab.jobs.runner.folder(tab.jobs.store.get(job_id)))
    assert recipe["instance_data_dir"] == str(roots.data / "shapes") and recipe["train_data_dir"] is None
    assert recipe["with_prior_preservation"] and recipe["class_prompt"] == "a photo of a shape"
    assert recipe["class_data_dir"] == str(roots.data / "class-images" / "a-photo-of-a-shape")
    message, _ = tab.form.start(None, *form(method="subject"))
    assert "needs the instance prompt" in message
    _, job_id = tab.form.start(None, *form(source="hub", dataset="lambdalabs/naruto-blip-captions"))
    recipe = read_recipe(tab.jobs.runner.folder(tab.jobs.store.get(job_id)))
    assert recipe["dataset_name"] == "lambdalabs/naruto-blip-captions" and recipe["train_data_dir"] is None


def test_uploads_beyond_the_caps_are_refused_and_an_unreadable_image_is_skipped_and_counted(roots, monkeypatch):
    tab = make_tab(roots)
    upload = roots.tmp / "upload"
    upload.mkdir()
    files = [str(image(upload / f"{index}.png")) for index in range(3)]
    monkeypatch.setattr(uploads, "MAX_UPLOAD_IMAGES", 2)
    message, _ = tab.form.start(None, *form(source="upload", files=files))
    assert "3 images uploaded: at most 2" in message
    monkeypatch.setattr(uploads, "MAX_UPLOAD_IMAGES", 10)
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 100)
    assert "at most 0 MiB" in tab.form.start(None, *form(source="upload", files=files))[0]
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 1 << 30)
    assert tab.jobs.list(None) == [] and not (roots.data / uploads.UPLOADS_FOLDER).exists()  # refused: none made
    (upload / "broken.png").write_bytes(b"not an image")
    huge = png_header_only(upload / "huge.png", 20_000, 20_000)  # over MAX_UPLOAD_PIXELS, never decoded
    message, job_id = tab.form.start(None, *form(source="upload", files=[*files, str(upload / "broken.png"),
                                                                           str(huge)]))
    assert message.startswith(f"Job {job_id} queued. 3 images saved in data/uploads/shapes-job; 2 skipped")
    assert "broken.png: cannot decode image" in message and "huge.png: image too large" in message
    assert str(upload) not in message  # the server's paths are not shown
    saved = roots.data / uploads.UPLOADS_FOLDER / "shapes-job"
    assert sorted(path.name for path in saved.iterdir()) == ["0.png", "1.png", "2.png"]
    assert read_recipe(tab.jobs.runner.folder(tab.jobs.store.get(job_id)))["train_data_dir"] == str(saved)
    _, again = tab.form.start(None, *form(source="upload", files=files))  # a fresh folder each upload
    assert read_recipe(tab.jobs.runner.folder(tab.jobs.store.get(again)))["train_data_dir"] == f"{saved}-2"


def test_captions_come_from_uploaded_files_and_the_typed_table_as_txt_files(roots):
    tab = make_tab(roots)
    upload = roots.tmp / "upload"
    upload.mkdir()
    pictures = [str(image(upload / name)) for name in ("a.png", "b.png", "c odd.png")]
    (upload / "a.txt").write_text("a red thing, uploaded\n")
    (upload / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "from the metadata"}) + "\n")
    files = [*pictures, str(upload / "a.txt"), str(upload / "metadata.jsonl")]
    rows = tab.form.upload_table(files)
    assert rows == [["a.png", "a red thing, uploaded"], ["b.png", "from the metadata"], ["c odd.png", ""]]
    rows[1][1], rows[2][1] = "typed over\nthe metadata", "typed for c"
    message, job_id = tab.form.start(None, *form(source="upload", files=files, captions=rows))
    folder = roots.data / uploads.UPLOADS_FOLDER / "shapes-job"
    assert {path.name: path.read_text() for path in folder.glob("*.txt")} == {
        "a.txt": "a red thing, uploaded", "b.txt": "typed over the metadata", "c_odd.txt": "typed for c"}
    assert message.startswith(f"Job {job_id} queued. 3 images saved") and "without a caption" not in message


def test_the_live_view_shows_a_jobs_losses_grid_and_log_from_its_files(roots):
    tab = make_tab(roots)
    _, job_id = tab.form.start(None, *form())
    wait_for(tab.jobs, job_id, ENDED, timeout=30)
    folder = tab.jobs.runner.folder(tab.jobs.store.get(job_id))
    output = folder / OUTPUT_FOLDER
    history = [{"step": 1, "train_loss": 0.5}, {"step": 2, "train_loss": 0.25}, {"step": 2, "validation_loss": 0.4}]
    (output / "loss_history.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))
    (output / "validation").mkdir()
    image(output / "validation" / "step-000001.png")
    image(output / "validation" / "step-000002.png", "blue")
    (folder / LOG_FILE).write_text(f"loading {folder}/output\nsteps:  50%|#####     | 2/4 [00:02<00:02, "
                                   "1.00it/s, loss=0.25]\n")
    rows, picker = tab.live.job_list(None, None)
    assert rows == [[job_id, "shapes-job", "done", ""]] and picker["value"] == job_id  # the newest, chosen
    state, train, validation, grid, log, shown = tab.live.view(job_id, None, None)
    assert state == f"Job {job_id} (shapes-job): **done**, step 2 / 4, 1.00 steps/s"
    assert train.values.tolist() == [[1, 0.5], [2, 0.25]] and validation.values.tolist() == [[2, 0.4]]
    assert [(Path(path).name, caption) for path, caption in grid] == [("step-000002.png", "step 2"),
                                                                      ("step-000001.png", "step 1")]  # newest first
    assert log.splitlines()[0] == "loading JOB/output" and "2/4" in log  # the job's folder is not shown

    # the next tick sends only what changed: a plot sent again is drawn again
    assert all(_skipped(value) for value in tab.live.view(job_id, shown, None)[:5])
    with (output / "loss_history.jsonl").open("a") as history_file:
        history_file.write(json.dumps({"step": 3, "train_loss": 0.125}) + "\n")
    state, train, validation, grid, log, shown = tab.live.view(job_id, shown, None)
    assert train.values.tolist()[-1] == [3, 0.125] and [_skipped(value) for value in (validation, grid, log)] == [
        True, True, True]
    assert not any(_skipped(value) for value in tab.live.view(job_id, None, None)[:5])  # a new page: all drawn


def _skipped(value) -> bool:
    return isinstance(value, dict) and value == {"__type__": "update"}


def test_delete_asks_first_and_deletes_the_confirmed_job(roots):
    tab = make_tab(roots)
    first, second = (tab.form.start(None, *form(name=name))[1] for name in ("one", "two"))
    wait_for(tab.jobs, second, ENDED, timeout=30)
    confirm, pending, message = tab.live.ask_delete(first, None)
    assert confirm["visible"] and pending == first and message.startswith(f"Delete job {first} (one)")
    assert len(tab.jobs.list(None)) == 2  # asked, not deleted
    assert tab.live.keep()[1:] == (None, "Nothing deleted.") and len(tab.jobs.list(None)) == 2
    assert tab.live.confirm_delete(None, None)[2] == "Nothing to delete: press Delete first."
    folder = tab.jobs.runner.folder(tab.jobs.store.get(first))
    confirm, pending, message = tab.live.confirm_delete(first, None)
    assert not confirm["visible"] and message == f"Job {first} deleted." and not folder.exists()
    assert [job["id"] for job in tab.jobs.list(None)] == [second]
    event = tab.events["confirm_delete"]
    assert [block.label if hasattr(block, "label") else None for block in event.inputs] == [None]  # the pending id


def test_another_users_job_is_not_listed_read_or_controlled(roots):
    tab = make_tab(roots, auth=True, script="sleep 30\n")
    _, job_id = tab.form.start(ALICE, *form())
    assert tab.jobs.store.get(job_id).state == "running"
    assert tab.live.job_list(None, BOB)[0] == [] and tab.live.job_list(None, ALICE)[0][0][0] == job_id
    assert tab.live.view(job_id, None, BOB)[0].startswith(f"No training job {job_id}")
    for action in ("stop", "cancel", "resume"):
        assert tab.live.control(action)(job_id, BOB).startswith(f"No training job {job_id}")
    assert tab.live.ask_delete(job_id, BOB)[2].startswith(f"No training job {job_id}")
    assert tab.live.confirm_delete(job_id, BOB)[2].startswith(f"No training job {job_id}")
    assert tab.jobs.store.get(job_id).state == "running" and not tab.jobs.store.get(job_id).stop_requested
    assert tab.live.control("cancel")(job_id, ALICE).startswith(f"Job {job_id}: cancelled")
    assert wait_for(tab.jobs, job_id, ENDED, timeout=30)["state"] == "stopped"
    assert "Sign in first" in tab.form.start(None, *form())[0]


def test_save_and_sample_now_leave_their_requests_for_the_trainer_and_score_waits_for_a_done_job(roots):
    tab = make_tab(roots, script="sleep 30\n")
    _, job_id = tab.form.start(ALICE, *form())
    assert tab.jobs.store.get(job_id).state == "running"
    output = tab.jobs.runner.folder(tab.jobs.store.get(job_id)) / OUTPUT_FOLDER
    assert tab.live.request_now("save")(job_id, ALICE) == f"Job {job_id}: save now asked: at its next step."
    assert tab.live.request_now("sample")(job_id, ALICE) == f"Job {job_id}: sample now asked: at its next step."
    assert (output / "save_now.request").exists() and (output / "sample_now.request").exists()
    assert tab.jobs.status(ALICE, job_id)["pending_requests"] == ["save", "sample"]
    assert tab.live.score(job_id, ALICE).startswith(f"Job {job_id} is running") and len(tab.jobs.list(ALICE)) == 1
    tab.live.control("cancel")(job_id, ALICE)
    wait_for(tab.jobs, job_id, ENDED, timeout=30)


def test_compare_with_base_opens_the_compare_tab_on_base_and_model(roots):
    tab = make_tab(roots, served=["shapes-job"])
    _, job_id = tab.form.start(None, *form())
    assert tab.live.compare_with_base(job_id, None)[-1].endswith("Compare with base opens on a done job.")
    wait_for(tab.jobs, job_id, ENDED, timeout=30)
    tabs, prompt, models, seed, message = tab.live.compare_with_base(job_id, None)
    assert (tabs.selected, prompt, models, seed) == (COMPARE_TAB, "a red circle", ["base", "shapes-job"], 7)
    outputs = tab.events["compare_with_base"].outputs  # the Compare tab's own controls
    assert isinstance(outputs[0], gr.Tabs) and [block.label for block in outputs[1:3]] == [
        "Prompt", "Models (one column each)"] and outputs[3].label.startswith("Seed")
    other = make_tab(roots)  # its job's model is not served
    assert "is not served yet" in other.live.compare_with_base(job_id, None)[-1]


def test_the_data_folders_are_those_under_the_data_root(roots):
    tab = make_tab(roots)
    (roots.data / "shapes" / "sub").mkdir()
    (roots.data / ".hidden").mkdir()
    assert tab.form.data_folders() == ["shapes", "shapes/sub"]
    message, _ = tab.form.start(None, *form(folder="../models/base"))
    assert "Folder '../models/base' is not under the data root" in message and str(roots.tmp) not in message
    message, _ = tab.form.start(None, *form(base="../data/shapes"))
    assert "outside the folders jobs may read" in message and str(roots.tmp) not in message
    assert tab.jobs.list(None) == []


@pytest.mark.slow  # a headless browser (about 10 s)
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_in_a_browser_the_train_tab_fills_its_form_from_a_recipe_and_lists_a_job(roots):
    from playwright.sync_api import expect, sync_playwright

    from docs.screenshot import CHROMIUM, CHROMIUM_FLAGS
    from sdtune.app.launch import LAUNCH_OPTIONS

    tab = make_tab(roots)
    _, job_id = tab.form.start(None, *form())
    wait_for(tab.jobs, job_id, ENDED, timeout=30)
    tab.demo.queue(default_concurrency_limit=1)
    tab.demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **LAUNCH_OPTIONS)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.goto(tab.demo.local_url)
            page.get_by_role("tab", name="Train", exact=True).click()
            page.get_by_label("Recipe (configs/)").click()
            page.get_by_role("option", name="tiny-lora", exact=True).click()
            steps = page.get_by_role("spinbutton", name="Steps", exact=True)
            expect(steps).to_have_value("400")  # the recipe's value, in the form
            expect(page.get_by_text(f"Job {job_id} (shapes-job): done").first).to_be_visible(timeout=15_000)
            browser.close()
    finally:
        tab.demo.close()


STORY_STEPS, STORY_EVERY = 48, 4  # a checkpoint and a grid every 4 steps; Stop comes at the first grid, mid-job
STORY_ADVANCED = ("validation_inference_steps: 2\ngradient_accumulation_steps: 1\nuse_ema: false\n"
                  "checkpoints_total_limit: 2\n")


@pytest.fixture
def story_app(tmp_path, tiny_pipeline):
    """The app as `gradio_app.py --train` builds it, in this process: the tiny stock model served, the real trainer,
    a finished job's model served through the model manager (launch.py's on_done), and 8 captioned creatures of the
    tiny world to upload."""
    from itertools import islice

    from sdtune.app.job_models import serve_finished
    from sdtune.app.launch import LAUNCH_OPTIONS
    from tinyworld.datasets import creatures

    upload = tmp_path / "upload"
    upload.mkdir()
    for index, (picture, caption) in enumerate(islice(creatures(heldout=False, per_pair=1, seed=0), 8)):
        picture.save(upload / f"creature-{index}.png")
        (upload / f"creature-{index}.txt").write_text(caption)
    (tmp_path / "data").mkdir()
    service = Service(ModelRegistry([ModelSpec("stock", str(tiny_pipeline))], device="cpu"), tmp_path / "outputs",
                      tmp_path / "inputs", models_root=tmp_path / "models")
    service.models.allow_root(tmp_path / "jobs")
    jobs = TrainingJobs(tmp_path / "jobs", tmp_path / "data", [tiny_pipeline, tmp_path / "models"],
                        env=subprocess_env(threads=1),
                        on_done=lambda finished: serve_finished(service.models, finished))
    jobs.runner.start_scheduler(interval=0.5)
    demo = build_ui(service, jobs)
    demo.queue(default_concurrency_limit=1)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **LAUNCH_OPTIONS)
    try:
        yield SimpleNamespace(url=demo.local_url, upload=upload, jobs=jobs)
    finally:
        demo.close()
        jobs.runner.shutdown()
        for job in jobs.list(None):  # no trainer outlives the test
            if job["state"] in ("queued", "running"):
                jobs.cancel(None, job["id"])


@contextlib.contextmanager
def trainer_paused_after_first_grid(jobs, job_id: int, timeout: float = 300):
    """Freeze a running job's trainer (SIGSTOP to its process group) once its first validation grid is written, and
    let it go on leaving the block: a Stop sent meanwhile waits for SIGCONT, then ends the step under way. Without
    the pause, a fast machine finished the 48 steps between the grid's display and the click."""
    from sdtune.jobs.live import VALIDATION_FOLDER

    job = jobs.store.get(job_id)
    grids = jobs.runner.folder(job) / OUTPUT_FOLDER / VALIDATION_FOLDER
    deadline = time.monotonic() + timeout
    while not (grids.is_dir() and any(grids.glob("step-*.png"))):
        assert time.monotonic() < deadline, "no validation grid in time"
        assert jobs.store.get(job_id).state in ("queued", "running"), jobs.store.get(job_id)
        time.sleep(0.05)
    pid = jobs.store.get(job_id).pid
    os.killpg(pid, signal.SIGSTOP)
    try:
        assert jobs.status(None, job_id)["step"] < STORY_STEPS  # paused on the way, not after the end
        yield
    finally:
        os.killpg(pid, signal.SIGCONT)


@pytest.mark.slow  # a headless browser and a LoRA job of 48 steps on the tiny world, stopped and resumed
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_in_a_browser_a_lora_job_is_uploaded_trained_stopped_resumed_served_and_generates(story_app):
    import re

    from playwright.sync_api import expect, sync_playwright
    from test_browser import offered

    from docs.screenshot import CHROMIUM, CHROMIUM_FLAGS, fill, wait_for_result

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.goto(story_app.url)
        page.get_by_role("tab", name="Train", exact=True).click()
        fill(page, "Job name", "creatures")
        page.get_by_label("Recipe (configs/)").click()
        page.get_by_role("option", name="tiny-lora", exact=True).click()
        expect(page.get_by_role("spinbutton", name="Steps", exact=True)).to_have_value("400")
        page.get_by_label("Base model").click()
        page.get_by_role("option", name="stock", exact=True).click()
        page.get_by_label("Images uploaded here").check()
        files = sorted(str(path) for path in story_app.upload.iterdir())  # the images and their .txt captions
        page.locator(".block").filter(has_text="with .txt captions").locator("input[type=file]").first.set_input_files(
            files)
        captions = page.get_by_role("grid", name=re.compile("^Captions"))
        expect(captions.get_by_text("creature-7.png").first).to_be_visible(timeout=30_000)  # read from the .txt
        for label, value in [("Steps", STORY_STEPS), ("LoRA rank", 4), ("Resolution", 32), ("Batch", 4),
                             ("Checkpoint every", STORY_EVERY), ("...or every (steps", STORY_EVERY), ("Seed", 7)]:
            fill(page, label, str(value))
        fill(page, "Advanced", STORY_ADVANCED)
        page.get_by_role("button", name="Start", exact=True).click()
        expect(page.get_by_text("Job 1 queued. 8 images saved")).to_be_visible(timeout=30_000)

        # the live view, refreshed by the tab's timer: the job runs, its loss plot and a validation grid appear
        state = page.get_by_text(re.compile(r"^Job 1 \(creatures\): "))
        expect(state).to_contain_text("running", timeout=120_000)
        with trainer_paused_after_first_grid(story_app.jobs, 1):  # so that Stop lands mid-job on any machine
            grid = page.locator(".block").filter(has_text="Validation grids").locator("img").first
            expect(grid).to_have_attribute("src", re.compile(r"step-\d+\.png"), timeout=60_000)
            train_plot = page.locator(".block").filter(has_text="Training loss").locator("canvas, svg.marks")
            expect(train_plot.first).to_be_visible(timeout=30_000)
            page.get_by_role("button", name="Stop", exact=True).click()
            expect(page.get_by_text("Job 1: stopping")).to_be_visible(timeout=30_000)
        expect(state).to_contain_text("stopped", timeout=120_000)
        stopped_at = story_app.jobs.status(None, 1)["step"]
        assert 0 < stopped_at < STORY_STEPS, stopped_at  # stopped on the way, not at the end

        page.get_by_role("button", name="Resume", exact=True).click()
        expect(page.get_by_text("Job 1: queued again")).to_be_visible(timeout=30_000)
        expect(state).to_contain_text("done", timeout=600_000)
        expect(state).to_contain_text(f"step {STORY_STEPS} / {STORY_STEPS}")

        # the finished job's model is offered in the text-to-image picker of the same page, and generates
        header = page.locator(".prose.sdtune-header").filter(has_text="Models:")  # on_done serves it just after done
        expect(header).to_contain_text("Models: stock, creatures", timeout=60_000)
        assert offered(page, "creatures")
        picker = page.get_by_label("Model", exact=True).first
        picker.fill("creatures")  # typed and entered: the timer's refresh re-renders an open option list
        picker.press("Enter")
        expect(picker).to_have_value("creatures")
        page.get_by_label("Prompt", exact=True).first.fill(
            "a drawing of a yellow creature with long ears on a white background")
        for label, value in [("Width", 32), ("Height", 32), ("Steps", 2)]:
            fill(page, label, str(value))
        page.get_by_role("button", name="Generate").first.click()
        wait_for_result(page, timeout_ms=120_000)
        expect(page.locator(".sdtune-result img[src*='-creatures-']").first).to_be_visible()
        browser.close()
