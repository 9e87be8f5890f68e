"""python -m sdtune.batch: random-model image to image over a folder, resumable and distributable."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, subprocess_env
from sdtune.batch import main
from sdtune.pnginfo import parse_parameters, read_parameters

GOOD = {"a_red_circle.png": ((70, 50), "red"), "a_blue_square.png": ((64, 64), "blue"),
        "sub/green_frog_01.jpg": ((40, 80), "green"), "yellow_star.png": ((64, 48), "yellow"),
        "orange_cat.png": ((90, 60), "orange"), "purple_bird.png": ((64, 64), "purple")}


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "inputs"
    for name, (size, colour) in GOOD.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
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
    assert summary["done"] == 6 and summary["failed"] == 3 and summary["skipped"] == 0
    assert {entries[k]["error"] != "" for k in ("notes.txt", "truncated.png", "huge.png")} == {True}
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


def test_the_cli_and_the_app_batch_make_the_same_image(inputs, tmp_path, tiny_pipeline):
    from sdtune.generate import GenerationSettings
    from sdtune.registry import ModelRegistry, ModelSpec
    from sdtune.serving import BatchItem, Service

    out = tmp_path / "out"
    run(inputs, out, [f"stock={tiny_pipeline}"], "--batch_size", "1")
    service = Service(ModelRegistry([ModelSpec("stock", str(tiny_pipeline))], device="cpu"), tmp_path / "app",
                      inputs)
    settings = GenerationSettings(num_inference_steps=4, strength=0.5)
    *_, final = service.random_batch([BatchItem("a_red_circle.png", inputs / "a_red_circle.png")], ["stock"], "",
                                     5, settings)
    assert np.array_equal(pixels(final.rows[0].output), pixels(out / manifest(out)["a_red_circle.png"]["output"]))


def run_processes(inputs, output, models, processes: int):
    """The CLI in child processes with one thread each (thread counts change float rounding, so both runs match)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    command = [*(launcher if processes > 1 else [sys.executable, "-m"]), "sdtune.batch", "--input", str(inputs),
               "--output", str(output), "--models", *models, "--seed", "5", "--num_inference_steps", "4",
               "--strength", "0.5", "--batch_size", "2"]
    result = subprocess.run(command, env=dict(subprocess_env(threads=1), ACCELERATE_USE_CPU="true"), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_give_the_single_process_result(inputs, tmp_path, tiny_pipeline, finetuned_pipeline):
    models = [f"stock={tiny_pipeline}", f"tuned={finetuned_pipeline}"]
    single, double = tmp_path / "single", tmp_path / "double"
    run_processes(inputs, single, models, 1)
    run_processes(inputs, double, models, 2)
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
