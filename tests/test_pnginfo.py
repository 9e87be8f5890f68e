"""The `parameters` text of PNGs: AUTOMATIC1111's as it writes it, ours, and what a form can take from them."""

import time

import pytest

from sdtune.app.recall import recall
from sdtune.generation.core import GenerationSettings
from sdtune.generation.pnginfo import MAX_PARAMETERS_CHARS, format_parameters, parse_parameters

MODELS = ["stock", "tuned", "lora"]

# AUTOMATIC1111 1.10's text to image with hires fix, a LoRA in the prompt and a negative prompt over two lines
A1111_HIRES = """masterpiece, best quality, (a red dragon:1.2), flying over a castle,
dramatic light, <lora:dragons_v2:0.8>
Negative prompt: blurry, lowres, (worst quality:1.4),
bad anatomy, watermark
Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3735928559, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.ckpt, \
Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+, \
Lora hashes: "dragons_v2: 1f2e3d4c5b6a, style: 0a1b2c3d4e5f", Version: v1.10.1"""

# An older A1111 (1.5): the schedule in the sampler's name, image to image, no negative prompt
A1111_OLD_IMG2IMG = """a watercolor painting of a fox, autumn forest
Steps: 20, Sampler: Euler a, CFG scale: 6.5, Seed: 42, Size: 64x64, Model hash: 8f4e2d1c, Model: stock, \
Denoising strength: 0.6, Mask blur: 4, Version: v1.5.1"""


def test_a1111_text_with_multiline_prompts_and_quoted_fields():
    fields = parse_parameters(A1111_HIRES)
    assert fields["prompt"] == ("masterpiece, best quality, (a red dragon:1.2), flying over a castle,\n"
                                "dramatic light, <lora:dragons_v2:0.8>")
    assert fields["negative_prompt"] == "blurry, lowres, (worst quality:1.4),\nbad anatomy, watermark"
    assert fields["Lora hashes"] == "dragons_v2: 1f2e3d4c5b6a, style: 0a1b2c3d4e5f"
    assert (fields["Schedule type"], fields["Hires upscaler"], fields["Version"]) == ("Karras", "R-ESRGAN 4x+",
                                                                                      "v1.10.1")
    assert (fields["Steps"], fields["Size"], fields["Clip skip"]) == ("30", "512x768", "2")


def test_a1111_settings_map_to_the_form_with_notes_for_what_is_not_here():
    result = recall(A1111_HIRES, MODELS)
    assert result.values == {
        "prompt": parse_parameters(A1111_HIRES)["prompt"], "negative_prompt": "blurry, lowres, (worst quality:1.4),"
        "\nbad anatomy, watermark", "scheduler": "dpmsolver++", "num_inference_steps": 30, "guidance_scale": 7.0,
        "strength": 0.45, "seed": 3735928559, "width": 512, "height": 768}
    assert any("Model 'v1-5-pruned-emaonly' is not served here" in note for note in result.notes)
    assert any("Schedule type 'Karras' is not offered here" in note for note in result.notes)


def test_an_old_a1111_sampler_name_with_its_schedule_and_a_model_served_here():
    result = recall(A1111_OLD_IMG2IMG.replace("Euler a", "DPM++ 2M Karras"), MODELS)
    assert result.values["scheduler"] == "dpmsolver++" and result.values["model"] == "stock"
    assert [note for note in result.notes if "Karras" in note]
    result = recall(A1111_OLD_IMG2IMG, MODELS)
    assert result.notes == [] and result.values["negative_prompt"] == ""
    assert (result.values["scheduler"], result.values["guidance_scale"], result.values["strength"]) == ("euler_a",
                                                                                                       6.5, 0.6)


def test_a_sampler_with_no_counterpart_leaves_the_scheduler():
    result = recall(A1111_OLD_IMG2IMG.replace("Euler a", "UniPC"), MODELS)
    assert "scheduler" not in result.values and "Sampler 'UniPC' is not offered here" in result.notes[0]


def test_our_own_parameters_round_trip():
    settings = GenerationSettings(num_inference_steps=4, guidance_scale=5.5, width=64, height=48,
                                  negative_prompt="ugly, \"dull\"\nand grey", scheduler="ddim", strength=0.35)
    prompt = "a red circle, on white\nsecond line: with a colon"
    text = format_parameters(prompt, settings, 77, "lora", image_to_image=True, lora_scale=-0.75)
    assert recall(text, MODELS).values == dict(
        prompt=prompt, negative_prompt=settings.negative_prompt, model="lora", scheduler="ddim",
        num_inference_steps=4, guidance_scale=5.5, seed=77, width=64, height=48, strength=0.35, lora_scale=-0.75)
    assert recall(text, MODELS).notes == []


@pytest.mark.parametrize("text", ["", "   \n", None])
def test_no_parameters_is_said_not_crashed_on(text):
    result = recall(text, MODELS)
    assert result.values == {} and "no generation parameters" in result.notes[0]


def test_a_text_without_settings_line_is_all_prompt():
    text = "a castle, style: gothic\nNegative prompt: fog, rain"
    result = recall(text, MODELS)
    assert result.values == {"prompt": "a castle, style: gothic", "negative_prompt": "fog, rain"}
    assert "No settings line" in result.notes[0]


@pytest.mark.parametrize("field, value, kept, message", [
    ("Steps", "abc", "num_inference_steps", "is not a valid value"),
    ("Steps", "0", "num_inference_steps", "at least 1"),
    ("Size", "12", "width", "expected WIDTHxHEIGHT"),
    ("Size", "100x64", "width", "multiple of 8"),
    ("CFG scale", "nan", "guidance_scale", "finite"),
    ("CFG scale", "25", "guidance_scale", "at most 20"),  # the forms' range, one for every caller
    ("Seed", "-1", "seed", "whole number from 0"),
    ("Seed", "12.5", "seed", "whole number from 0"),
    ("Denoising strength", "0", "strength", r"in (0, 1]"),
])
def test_malformed_values_are_reported_and_the_rest_applied(field, value, kept, message):
    fields = {"Steps": "20", "Sampler": "DDIM", "CFG scale": "7", "Seed": "5", "Size": "64x64",
              "Denoising strength": "0.5", field: value}
    text = "a prompt\n" + ", ".join(f"{key}: {item}" for key, item in fields.items())
    result = recall(text, MODELS)
    assert kept not in result.values and result.values["scheduler"] == "ddim"
    assert len(result.notes) == 1 and result.notes[0].startswith(f"{field}: {value!r} not applied") \
        and message in result.notes[0]


def test_an_unterminated_quote_is_kept_as_written():
    fields = parse_parameters('p\nSteps: 3, Lora hashes: "a: 1, Seed: 9, Size: 64x64')
    assert fields["Lora hashes"] == '"a: 1' and fields["Seed"] == "9"


def test_a_long_settings_line_is_read_in_linear_time():
    # a run of words with no colon made the A1111 pattern retry from each letter: 32 KB took 4 s, 64 KB 16 s
    words = "a " * (MAX_PARAMETERS_CHARS // 2 - 16)
    start = time.perf_counter()
    fields = parse_parameters(f"p\nSteps: 3, Sampler: DDIM, Seed: 9, {words}, Size: 64x64")
    assert time.perf_counter() - start < 1.0
    assert fields["Steps"] == "3" and fields["Size"] == "64x64" and len(fields) == 6


def test_a_text_longer_than_the_cap_is_refused_with_a_note():
    result = recall("a prompt " * (MAX_PARAMETERS_CHARS // 9 + 1) + "\nSteps: 3, Sampler: DDIM, Seed: 9", MODELS)
    assert result.values == {} and f"more than the {MAX_PARAMETERS_CHARS:,} this reads" in result.notes[0]
