"""python -m sdtune.batch: random-model image to image over a folder, resumable and distributable."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, subprocess_env
from PIL import Image

from sdtune.batch.cli import main
from sdtune.generation.pnginfo import parse_parameters, read_parameters

GOOD = {"a_red_circle.png": ((70, 50), "red"), "a_blue_square.png": ((64, 64), "blue"),
        "sub/green_frog_01.jpg": ((40, 80), "green"), "yellow_star.png": ((64, 48), "yellow"),
        "orange_cat.png": ((90, 60), "orange"), "purple_bird.png": ((64, 64), "purple")}


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "inputs"
    for name, (size, colour) in GOOD.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(folder / name)
    (folder / "notes.txt").write_text("not an image: not listed")
    (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    Image.new("1", (8200, 8200)).save(folder / "huge.png")  # 67 megapixels in a small file
    return folder


def run(inputs, output, models, *extra):
    return main(["--input", str(inputs), "--output", str(output), "--models", *models, "--seed", "5",
                 "--num_inference_steps", "4", "--strength", "0.5", "--batch_size", "2", *extra])


def manifest(output) -> dict[str, dict]:
    return {e["input"]: e for e in map(json.loads, (output / "manifest.jsonl").read_text().splitlines())}


def pixels(path):
    return np.asarray(Image.open(path))


def test_every_image_gets_a_drawn_model_an_output_and_a_manifest_line(inputs, tmp_path, tiny_pipeline,
                                                                       finetuned_pipeline):
    out = tmp_path / "out"
    summary = run(inputs, out, [f"stock={tiny_pipeline}", f"tuned={finetuned_pipeline}"])
    entries = manifest(out)
    assert summary["done"] == 6 and summary["failed"] == 2 and summary["skipped"] == 0
    assert {entries[k]["error"] != "" for k in ("truncated.png", "huge.png")} == {True} and "notes.txt" not in entries
    assert "too large" in entries["huge.png"]["error"]
    assert {entries[k]["model"] for k in GOOD} == {"stock", "tuned"}
    for key, (size, _) in GOOD.items():
        entry = entries[key]
        assert entry["output"] == f"{key.rsplit('.', 1)[0]}-{entry['model']}-{entry['seed']}.png"
        assert Image.open(out / entry["output"]).size == size  # returned at the input's size
        parameters = parse_parameters(read_parameters(out / entry["output"]))
        assert parameters["prompt"] == entry["prompt"] and parameters["Model"] == entry["model"]
    assert entries["sub/green_frog_01.jpg"]["prompt"] == "green frog"
    assert not list(out.glob("manifest.part-*"))


def test_a_rerun_skips_what_is_done_and_redoes_what_was_lost(inputs, tmp_path, tiny_pipeline):
    out = tmp_path / "out"
    run(inputs, out, [f"stock={tiny_pipeline}"])
    first = manifest(out)
    again = run(inputs, out, [f"stock={tiny_pipeline}"])
    assert again["done"] == 0 and again["skipped"] == 6

    # a kill loses an output and leaves a half-written manifest line: only that image is redone, identically
    lost = first["orange_cat.png"]
    original = pixels(out / lost["output"])
    (out / lost["output"]).unlink()
    lines = (out / "manifest.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["input"] != "orange_cat.png"]
    (out / "manifest.jsonl").write_text("\n".join(kept) + '\n{"input": "orange_ca')
    resumed = run(inputs, out, [f"stock={tiny_pipeline}"])
    assert resumed["done"] == 1 and resumed["skipped"] == 5
    assert np.array_equal(pixels(out / lost["output"]), original)


def test_the_cli_and_the_app_batch_make_the_same_images(inputs, tmp_path, tiny_pipeline, finetuned_pipeline):
    from sdtune.app.service import Service
    from sdtune.generation.core import GenerationSettings
    from sdtune.generation.registry import ModelRegistry, ModelSpec

    out = tmp_path / "out"
    run(inputs, out, [f"stock={tiny_pipeline}", f"tuned={finetuned_pipeline}"], "--batch_size", "4")
    registry = ModelRegistry([ModelSpec("stock", str(tiny_pipeline)), ModelSpec("tuned", str(finetuned_pipeline))],
                             device="cpu")
    service = Service(registry, tmp_path / "app", inputs)
    settings = GenerationSettings(num_inference_steps=4, strength=0.5)
    *_, final = service.random_batch(service.folder_items(str(inputs)), ["stock", "tuned"], "", 5, settings)
    cli = manifest(out)
    made = {row.file: row for row in final.rows if row.output}
    assert made.keys() == GOOD.keys() and {row.model for row in made.values()} == {"stock", "tuned"}
    for key, row in made.items():
        assert (row.model, row.seed, row.prompt) == (cli[key]["model"], cli[key]["seed"], cli[key]["prompt"])
        assert np.array_equal(pixels(row.output), pixels(out / cli[key]["output"]))


def start_processes(inputs, output, models, processes: int) -> subprocess.Popen:
    """The CLI in child processes with one thread each (thread counts change float rounding, so both runs match)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    command = [*(launcher if processes > 1 else [sys.executable, "-m"]), "sdtune.batch", "--input", str(inputs),
               "--output", str(output), "--models", *models, "--seed", "5", "--num_inference_steps", "4",
               "--strength", "0.5", "--batch_size", "2"]
    return subprocess.Popen(command, env=dict(subprocess_env(threads=1), ACCELERATE_USE_CPU="true"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]


@pytest.mark.slow  # two batch processes
def test_two_processes_give_the_single_process_result(inputs, tmp_path, tiny_pipeline, finetuned_pipeline):
    models = [f"stock={tiny_pipeline}", f"tuned={finetuned_pipeline}"]
    single, double = tmp_path / "single", tmp_path / "double"
    processes = [start_processes(inputs, single, models, 1), start_processes(inputs, double, models, 2)]  # side by side
    for process in processes:
        finish(process)
    one, two = manifest(single), manifest(double)
    drop_time = lambda entries: {k: {f: v for f, v in e.items() if f != "seconds"} for k, e in entries.items()}  # noqa
    assert drop_time(one) == drop_time(two)  # each image once, same model, seed, prompt and name
    for entry in one.values():
        if entry["output"]:
            assert np.array_equal(pixels(single / entry["output"]), pixels(double / entry["output"]))


def test_missing_input_or_empty_model_list_stops_at_once(tmp_path, tiny_pipeline):
    with pytest.raises(SystemExit, match="no such folder"):
        main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--models",
              f"stock={tiny_pipeline}"])
    (tmp_path / "in").mkdir()
    empty = tmp_path / "models.yaml"
    empty.write_text("models: []\n")
    with pytest.raises(SystemExit, match="empty"):
        main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--models", str(empty)])


def test_a_rerun_with_other_settings_stops_before_loading_models_and_names_them(inputs, tmp_path, tiny_pipeline,
                                                                                  monkeypatch):
    out = tmp_path / "out"
    run(inputs, out, [f"stock={tiny_pipeline}"])
    before = manifest(out)
    monkeypatch.setattr("sdtune.batch.run.ModelRegistry", no_models)
    with pytest.raises(SystemExit, match=r"--seed 5 -> 6.*--strength 0\.5 -> 0\.7.*another --output"):
        run(inputs, out, [f"stock={tiny_pipeline}"], "--seed", "6", "--strength", "0.7")
    with pytest.raises(SystemExit, match=r"--prompt None -> 'a frog'"):
        run(inputs, out, [f"stock={tiny_pipeline}"], "--prompt", "a frog")
    assert manifest(out) == before


def no_models(*args, **kwargs):
    raise AssertionError("models must not be loaded")


def test_an_output_folder_inside_the_input_is_never_read_as_input(inputs, tmp_path, tiny_pipeline):
    out = inputs / "out"
    first = run(inputs, out, [f"stock={tiny_pipeline}"])
    again = run(inputs, out, [f"stock={tiny_pipeline}"])
    assert first["done"] == 6 and again["done"] == 0 and again["skipped"] == 6
    assert again["failed"] == 2  # the broken two
    assert not [key for key in manifest(out) if key.startswith("out/")]


def test_a_file_name_that_is_not_utf8_is_processed_like_any_other(tmp_path, tiny_pipeline):
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.new("RGB", (64, 48), "red").save(folder / "a_red_circle.png")
    Image.new("RGB", (48, 64), "blue").save(os.fsdecode(bytes(folder) + b"/caf\xe9_blue.png"))
    out = tmp_path / "out"
    summary = run(folder, out, [f"stock={tiny_pipeline}"])
    entry = manifest(out)[os.fsdecode(b"caf\xe9_blue.png")]
    assert summary["done"] == 2 and summary["failed"] == 0 and entry["prompt"] == "caf\\xe9 blue"
    assert entry["output"] == f"caf\\xe9_blue-stock-{entry['seed']}.png"
    assert parse_parameters(read_parameters(out / entry["output"]))["prompt"] == "caf\\xe9 blue"
    assert run(folder, out, [f"stock={tiny_pipeline}"])["skipped"] == 2  # its manifest line reads back


def test_a_file_link_leading_outside_the_input_is_refused(inputs, tmp_path, tiny_pipeline):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 64), "black").save(secret)
    (inputs / "link.png").symlink_to(secret)
    out = tmp_path / "out"
    summary = run(inputs, out, [f"stock={tiny_pipeline}"])
    assert summary["done"] == 6 and "outside" in manifest(out)["link.png"]["error"]


def test_an_output_that_cannot_be_written_stops_before_loading_models(inputs, tmp_path, tiny_pipeline, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr("sdtune.batch.run.ModelRegistry", no_models)
    with pytest.raises(SystemExit, match="cannot be written"):
        run(inputs, blocker / "out", [f"stock={tiny_pipeline}"])


def test_a_full_disk_stops_the_run_with_its_reason_and_leaves_no_partial_file(inputs, tmp_path, tiny_pipeline,
                                                                             monkeypatch):
    def full_disk(image, fp, *args, **kwargs):
        Path(fp).write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="Cannot write to --output .*No space left on device"):
        run(inputs, out, [f"stock={tiny_pipeline}"])
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.png"))


def test_a_missing_model_at_its_native_resolution_is_a_clear_error(inputs, tmp_path, tiny_pipeline):
    with pytest.raises(SystemExit, match="Model 'gone' has no readable unet/vae config.*--models"):
        run(inputs, tmp_path / "out", [f"stock={tiny_pipeline}", f"gone={tmp_path / 'nowhere'}"])


def test_one_rule_lists_the_images_of_a_folder(tmp_path):
    from sdtune.data.folders import list_images
    from sdtune.evaluation.run import read_init_images
    from sdtune.seeds import prompt_seed

    folder, outside = tmp_path / "in", tmp_path / "outside"
    for path in [folder / "b.JPG", folder / "sub" / "a.png", folder / ".hidden.png", folder / ".cache" / "c.png",
                 folder / "out" / "d.png", outside / "e.png"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path, format="PNG")
    (folder / "notes.txt").write_text("")
    (folder / "linked_folder").symlink_to(outside, target_is_directory=True)
    (folder / "inside.png").symlink_to(folder / "b.JPG")
    (folder / "escape.png").symlink_to(outside / "e.png")
    Image.new("RGB", (8, 8)).save(os.fsdecode(bytes(folder) + b"/caf\xe9.png"), format="PNG")
    listed = {image.key: image.error for image in list_images(folder, exclude=folder / "out")}
    assert listed.keys() == {"b.JPG", "sub/a.png", "inside.png", "escape.png", os.fsdecode(b"caf\xe9.png")}
    assert "outside" in listed["escape.png"] and not listed["inside.png"]
    (folder / "escape.png").unlink()
    (folder / "out" / "d.png").unlink()
    names = sorted(read_init_images(folder))
    assert names == ["b.JPG", "caf\\xe9.png", "inside.png", "sub/a.png"]
    assert len({prompt_seed(0, name, 0) for name in names}) == 4
