"""The compare feature without its UI: each cell is the text-to-image tab's image, each axis changes what it names,
bad requests are refused before any model time, a broken model and Stop keep what was made."""

import threading
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from sdtune.app.compare import compare
from sdtune.app.compare_grid import EMPTY, label_font, layout
from sdtune.app.service import Service
from sdtune.errors import SdtuneError
from sdtune.generation.core import GenerationSettings
from sdtune.generation.pnginfo import parse_parameters, read_parameters
from sdtune.generation.registry import ModelRegistry, ModelSpec

PROMPT = "a red circle"
SMALL = GenerationSettings(num_inference_steps=2, width=64, height=64)


@pytest.fixture(scope="module")
def service(tiny_pipeline, finetuned_pipeline, tiny_adapter, tmp_path_factory):
    """The stock model, its fine-tune, a LoRA on the stock model (listed at 0.5) and a model that cannot load."""
    folder = tmp_path_factory.mktemp("compare")
    specs = [ModelSpec("stock", str(tiny_pipeline)), ModelSpec("tuned", str(finetuned_pipeline)),
             ModelSpec("lora", str(tiny_pipeline), lora=str(tiny_adapter), lora_scale=0.5),
             ModelSpec("broken", str(folder / "missing-model"))]
    return Service(ModelRegistry(specs, device="cpu"), folder / "out", folder)


def last(updates):
    *_, final = updates
    return final


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def text2img(service, model, seed, settings=SMALL, **scale):
    return service.text2img(PROMPT, model, seed, 1, settings, **scale).paths[0]


def test_each_cell_is_the_text_to_image_tabs_image_and_sits_in_its_place_in_the_grid(service):
    final = last(compare(service, PROMPT, ["stock", "tuned"], "seed", "2", 2**32 - 1, SMALL))
    assert final.columns == ["stock", "tuned"] and final.rows == ["Seed 4294967295", "Seed 0"]  # wraps as text2img
    assert [(cell.model, cell.row.seed) for cell in final.cells] == [("stock", 2**32 - 1), ("tuned", 2**32 - 1),
                                                                      ("stock", 0), ("tuned", 0)]
    grid = pixels(final.grid_path)
    boxes = layout((64, 64), final.columns, final.rows, label_font((64, 64)))
    assert grid.shape[1::-1] == boxes.size
    for index, cell in enumerate(final.cells):
        reference = text2img(service, cell.model, cell.row.seed)
        assert np.array_equal(pixels(cell.path), pixels(reference))
        assert read_parameters(cell.path) == read_parameters(reference)
        left, top, right, bottom = boxes.box(index // 2, index % 2)
        assert np.array_equal(grid[top:bottom, left:right], pixels(cell.path))
    assert not np.array_equal(pixels(final.cells[0].path), pixels(final.cells[1].path))  # the models differ
    grid_parameters = parse_parameters(read_parameters(final.grid_path))
    assert (grid_parameters["X Values"], grid_parameters["Y Type"], grid_parameters["Y Values"]) == \
        ("stock, tuned", "Seed", "4294967295, 0")
    assert final.run["kind"] == "compare" and final.run["images"] == 4 and final.run["stopped"] is False


@pytest.mark.parametrize("axis, values, changed", [("guidance_scale", "1, 7.5", [{"guidance_scale": 1.0}, {}]),
                                                   ("num_inference_steps", "1, 2", [{"num_inference_steps": 1}, {}])])
def test_an_axis_changes_the_setting_it_names(service, axis, values, changed):
    final = last(compare(service, PROMPT, ["lora"], axis, values, 9, SMALL))
    first, second = final.cells
    for cell, change in zip(final.cells, changed):
        reference = text2img(service, "lora", 9, replace(SMALL, **change))
        assert np.array_equal(pixels(cell.path), pixels(reference))
        assert read_parameters(cell.path) == read_parameters(reference)  # the listed scale, 0.5, and the setting
    assert not np.array_equal(pixels(first.path), pixels(second.path))


def test_the_lora_scale_axis_scales_adapters_and_shows_a_plain_model_once_per_row(service):
    final = last(compare(service, PROMPT, ["stock", "lora"], "lora_scale", "0, 1", 4, SMALL))
    assert final.columns == ["stock (no adapter)", "lora"] and final.rows == ["LoRA scale 0", "LoRA scale 1"]
    stock_off, lora_off, stock_on, lora_on = final.cells
    assert stock_off.path == stock_on.path and final.run["images"] == 3  # the plain image is drawn once
    assert np.array_equal(pixels(lora_off.path), pixels(stock_off.path))  # scale 0 is the base model
    full = text2img(service, "lora", 4, lora_scale=1)
    assert np.array_equal(pixels(lora_on.path), pixels(full)) and read_parameters(lora_on.path) == read_parameters(full)
    assert not np.array_equal(pixels(lora_on.path), pixels(stock_on.path))


@pytest.mark.parametrize("models, axis, values, settings, message", [
    ([], "seed", "2", SMALL, "models: none chosen"),
    (["stock", "nope"], "seed", "2", SMALL, r"models: unknown \['nope'\]; available: stock, tuned, lora, broken"),
    (["stock"], "seed", " ", SMALL, "values: empty; give the Seed values"),
    (["stock"], "guidance_scale", "1, x", SMALL, r"values: 'x' is not a number; e.g. \"3, 7.5, 12\""),
    (["stock"], "guidance_scale", "1,,2", SMALL, "has an empty item"),
    (["stock"], "guidance_scale", "1, -2", SMALL, "guidance_scale must be a finite number, 0 or more"),
    (["stock"], "num_inference_steps", "2.5", SMALL, "num_inference_steps: '2.5' is not a valid value"),
    (["stock"], "seed", "1, -5", SMALL, "values: seed must be a whole number"),
    (["stock"], "seed", "65", SMALL, "a seed count must be a whole number from 1 to 64"),
    (["stock", "tuned"], "seed", "33", SMALL, "2 models x 33 values = 66 cells; a comparison holds at most 64"),
    (["lora"], "lora_scale", "0, 3", SMALL, r"values \(LoRA scale\) must be a number from -2 to 2"),
    (["stock", "tuned"], "lora_scale", "0, 1", SMALL, r"none of \['stock', 'tuned'\] has a LoRA adapter"),
    (["stock"], "cfg", "1", SMALL, "axis must be one of seed, guidance_scale"),
    (["stock", "tuned"], "seed", "2", GenerationSettings(num_inference_steps=100, width=1024, height=1024),
     r"This comparison costs 419 megapixel-steps .* summed over its 4 images\); this server allows 8"),
])
def test_bad_requests_are_refused_naming_the_field_before_any_model_time(service, models, axis, values, settings,
                                                                         message):
    logged = service.run_log.read_text() if service.run_log.exists() else ""
    with pytest.raises(SdtuneError, match=message):
        next(compare(service, PROMPT, models, axis, values, 1, settings))
    assert (service.run_log.read_text() if service.run_log.exists() else "") == logged


def test_a_broken_model_fails_its_cells_and_stop_keeps_the_cells_already_made(service):
    stop, steps = threading.Event(), []
    unet = service.registry.get("stock").unet

    def stop_in_the_third_cell(*args):  # stock's second image, 2 steps each: Stop during its first step
        steps.append(1)
        if len(steps) == 3:
            stop.set()

    hook = unet.register_forward_hook(stop_in_the_third_cell)
    try:
        final = last(compare(service, PROMPT, ["stock", "broken"], "seed", "3", 1, SMALL, stop))
    finally:
        hook.remove()
    made, broken, stopped = final.cells
    assert np.array_equal(pixels(made.path), pixels(text2img(service, "stock", 1)))
    assert broken.path is None and "'broken' could not be loaded" in broken.error and stopped.error == "stopped"
    assert final.run["stopped"] is True and final.run["failed"] == 1
    assert [cell["model"] for cell in final.run["failed_cells"]] == ["broken"]
    grid = pixels(final.grid_path)
    boxes = layout((64, 64), final.columns, final.rows, label_font((64, 64)))
    left, top, right, bottom = boxes.box(0, 0)
    assert np.array_equal(grid[top:bottom, left:right], pixels(made.path))
    for row, column in [(0, 1), (1, 0), (2, 1)]:  # failed, stopped, never started: no image in their boxes
        left, top, right, bottom = boxes.box(row, column)
        assert (grid[top:top + 3, left:right] == EMPTY).all()
