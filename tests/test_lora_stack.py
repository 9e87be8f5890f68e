"""LoRA stacks: several LoRA models of one base in one generation, from the request's rows or A1111's <lora:...>
prompt tokens, recorded in the PNG as A1111 records them, and bad stacks refused."""

import hashlib
import math
from pathlib import Path

import pytest
from helpers import adapter_in_memory
from PIL import Image

from sdtune.app.service import Service
from sdtune.errors import SdtuneError
from sdtune.generation.core import GenerationSettings, text_to_images
from sdtune.generation.lora_stack import parse_prompt
from sdtune.generation.pnginfo import parse_parameters
from sdtune.generation.registry import ModelRegistry, ModelSpec
from sdtune.training.lora import DIFFUSERS_WEIGHTS, save_adapter

PROMPT = "a red circle on a white background"
SETTINGS = GenerationSettings(num_inference_steps=3, width=64, height=64)


@pytest.fixture(scope="module")
def stack_service(tiny_pipeline, finetuned_pipeline, tmp_path_factory):
    """Stock, its fine-tune, two LoRA models of stock and one LoRA of the fine-tune."""
    folders = {}
    for seed, name in enumerate(["a", "b"]):
        pipeline, args = adapter_in_memory(tiny_pipeline, tmp_path_factory.mktemp("stack") / name, seed)
        save_adapter(args, pipeline.unet)
        folders[name] = Path(args.output_dir)
    specs = [ModelSpec("stock", str(tiny_pipeline)), ModelSpec("tuned", str(finetuned_pipeline)),
             *(ModelSpec(name, str(tiny_pipeline), lora=str(folder)) for name, folder in folders.items()),
             ModelSpec("tuned-a", str(finetuned_pipeline), lora=str(folders["a"]))]
    root = tmp_path_factory.mktemp("stack-app")
    return Service(ModelRegistry(specs, device="cpu"), root / "outputs", root), folders


def diffusers_stack(tiny_pipeline, folders, weights: dict) -> bytes:
    """The image diffusers draws with these adapters at these weights on a plain pipeline."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    for name in weights:
        pipeline.load_lora_weights(str(folders[name]), adapter_name=name)
    pipeline.set_adapters(list(weights), list(weights.values()))
    return text_to_images(pipeline, PROMPT, [0], SETTINGS)[0].tobytes()


def generated(service, prompt, model="stock", **options) -> tuple[bytes, dict]:
    outcome = service.text2img(prompt, model, 0, 1, SETTINGS, **options)
    image = Image.open(outcome.paths[0])
    return image.convert("RGB").tobytes(), parse_parameters(image.info["parameters"])


def test_a_stack_draws_what_diffusers_draws_with_the_same_adapters_and_weights(stack_service, tiny_pipeline):
    service, folders = stack_service
    expected = diffusers_stack(tiny_pipeline, folders, {"a": 0.7, "b": -0.4})
    rows, _ = generated(service, PROMPT, loras=[["a", 0.7], ["b", -0.4]])
    tokens, _ = generated(service, f"{PROMPT} <lora:a:0.7> <lora:b:-0.4>")
    on_a, _ = generated(service, f"<lora:b:-0.4>, {PROMPT}", model="a", lora_scale=0.7)  # the model's own + one
    assert rows == tokens == on_a == expected
    single, _ = generated(service, PROMPT, model="a", lora_scale=0.7)
    assert single == diffusers_stack(tiny_pipeline, folders, {"a": 0.7}) != expected
    plain, _ = generated(service, PROMPT)  # the stack is gone with its request
    assert plain == text_to_images(service.registry.get("stock"), PROMPT, [0], SETTINGS)[0].tobytes()


def a1111_hash(file: Path) -> str:
    data = file.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_the_png_records_the_stack_as_a1111_does_and_its_prompt_restores_it(stack_service):
    service, folders = stack_service
    image, parameters = generated(service, f"{PROMPT} <lora:b:0.5>", loras=[{"name": "a", "weight": 0.25}])
    assert parameters["prompt"] == f"{PROMPT} <lora:b:0.5> <lora:a:0.25>"
    hashes = {name: a1111_hash(folders[name] / DIFFUSERS_WEIGHTS) for name in "ab"}
    assert parameters["Lora hashes"] == f"b: {hashes['b']}, a: {hashes['a']}"
    again, _ = generated(service, parameters["prompt"])  # what PNG info and Send to fill in
    assert again == image


@pytest.mark.parametrize("prompt, loras, message", [
    (f"{PROMPT} <lora:zzz:0.5>", None, "prompt: 'zzz' is not a served LoRA model; served LoRA models: a, b, tuned-a"),
    (f"{PROMPT} <lora:a:nan>", None, r"prompt: the weight of <lora:a:nan> must be a number from -2 to 2"),
    (f"{PROMPT} <lora:a:3>", None, "must be a number from -2 to 2"),
    (f"{PROMPT} <lora::1>", None, "prompt: <lora::1> names no LoRA"),
    (PROMPT, [["a", math.nan]], r"loras: the weight of 'a' \(row 1\) must be a number"),
    (PROMPT, [["tuned", 1]], "loras: 'tuned' is not a served LoRA model"),
    (f"{PROMPT} <lora:a:1>", [["a", 0.5]], r"loras: \['a'\] given twice"),
    (PROMPT, [["tuned-a", 1]], "loras: 'tuned-a' is not a LoRA model on the base of 'stock'"),
])
def test_bad_stacks_are_refused_naming_the_field(stack_service, prompt, loras, message):
    service, _ = stack_service
    with pytest.raises(SdtuneError, match=message):
        service.text2img(prompt, "stock", 0, 1, SETTINGS, loras=loras)


def test_a1111_prompt_tokens_leave_the_text_the_encoder_sees():
    assert parse_prompt("a cat, <lora:x:0.5>, on a mat <lora:y>") == ("a cat, on a mat", [("x", 0.5), ("y", 1.0)])
    assert parse_prompt("<lora:x:0.8:te=1> a dog") == ("a dog", [("x", 0.8)])  # A1111's third field is ignored
    assert parse_prompt("no tokens") == ("no tokens", [])
    with pytest.raises(SdtuneError, match="prompt: the weight of <lora:x:high>"):
        parse_prompt("<lora:x:high>")
