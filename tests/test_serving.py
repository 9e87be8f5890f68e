"""The serving layer without the UI: shared weights, safetensors only, PNG parameters, Stop, seeds of a batch."""

import shutil
import threading

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.generate import GenerationSettings, Interrupted, text_to_images, working_size
from sdtune.pnginfo import format_parameters, parse_parameters, read_parameters, save_png
from sdtune.registry import ModelRegistry, ModelSpec, parse_model_flags, read_model_list
from sdtune.seeds import draw_model, image_seed
from sdtune.prompts import prompt_from_filename


def test_two_models_differing_in_their_unet_share_everything_else(tiny_pipeline, finetuned_pipeline):
    registry = ModelRegistry([ModelSpec("stock", str(tiny_pipeline)), ModelSpec("tuned", str(finetuned_pipeline))],
                             device="cpu")
    stock, tuned = registry.get("stock"), registry.get("tuned")
    assert stock.vae is tuned.vae and stock.text_encoder is tuned.text_encoder
    assert stock.unet is not tuned.unet
    distinct = {id(p): p.numel() for pipe in (stock, tuned) for part in (pipe.vae, pipe.text_encoder, pipe.unet)
                for p in part.parameters()}
    one_pipeline = sum(p.numel() for part in (stock.vae, stock.text_encoder, stock.unet) for p in part.parameters())
    assert sum(distinct.values()) == one_pipeline + sum(p.numel() for p in tuned.unet.parameters())


def test_pickle_weights_are_never_loaded(tiny_pipeline, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_pipeline, pickled)
    unet = pickled / "unet"
    torch.save(load_file(str(unet / "diffusion_pytorch_model.safetensors")), unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    registry = ModelRegistry([ModelSpec("ok", str(tiny_pipeline)), ModelSpec("pickled", str(pickled))], device="cpu")
    assert "pickled" in registry.errors and "ok" not in registry.errors  # the others keep serving


def test_model_lists(tmp_path):
    listing = tmp_path / "models.yaml"
    listing.write_text("models:\n  - name: a\n    path: x/y\n    variant: fp16\n  - name: b\n    path: ./b\n")
    assert read_model_list(listing) == [ModelSpec("a", "x/y", variant="fp16"), ModelSpec("b", "./b")]
    assert parse_model_flags(["s=CompVis/stable-diffusion-v1-4"]) == [ModelSpec("s", "CompVis/stable-diffusion-v1-4")]
    with pytest.raises(SdtuneError, match="duplicate"):
        parse_model_flags(["a=x", "a=y"])
    with pytest.raises(SdtuneError, match="name=path"):
        parse_model_flags(["just-a-path"])


def test_lazy_registry_loads_on_first_use_only(tiny_pipeline, monkeypatch):
    from diffusers import StableDiffusionPipeline

    loads, load = [], StableDiffusionPipeline.from_pretrained

    def counted_load(folder, **options):
        loads.append(folder)
        return load(folder, **options)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", counted_load)
    registry = ModelRegistry([ModelSpec("stock", str(tiny_pipeline))], device="cpu", lazy=True)
    assert loads == []
    pipeline = registry.get("stock")
    assert registry.get("stock") is pipeline and loads == [tiny_pipeline]


def test_stop_interrupts_between_denoising_steps(tiny_pipeline):
    registry = ModelRegistry([ModelSpec("stock", str(tiny_pipeline))], device="cpu")
    pipeline = registry.get("stock")
    calls = []
    hook = pipeline.unet.register_forward_hook(lambda *args: calls.append(1))
    settings = GenerationSettings(num_inference_steps=20, width=64, height=64)
    stop = threading.Event()
    stop.set()
    try:
        with pytest.raises(Interrupted):
            text_to_images(pipeline, "a red circle", [1], settings, stop)
        assert len(calls) == 1  # the step running when Stop came finishes; none after it
        text_to_images(pipeline, "a red circle", [1], settings)
        assert len(calls) == 21
    finally:
        hook.remove()


def test_png_parameters_round_trip_with_awkward_text(tmp_path):
    settings = GenerationSettings(num_inference_steps=30, guidance_scale=6.5, width=512, height=768,
                                  negative_prompt="blurry, low quality", scheduler="euler_a", strength=0.4)
    text = format_parameters("a cat, sitting: on a mat\nwith \"quotes\"", settings, 42, "my, model",
                             image_to_image=True)
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", text)
    parsed = parse_parameters(read_parameters(path))
    assert parsed["prompt"] == "a cat, sitting: on a mat\nwith \"quotes\""
    assert parsed["negative_prompt"] == "blurry, low quality"
    assert parsed["Model"] == "my, model" and parsed["Sampler"] == "Euler a" and parsed["Seed"] == "42"
    assert parsed["Size"] == "512x768" and parsed["Denoising strength"] == "0.4" and parsed["CFG scale"] == "6.5"


def test_batch_draws_depend_on_name_not_order():
    names = [f"image_{i}.png" for i in range(40)]
    draws = {n: draw_model(7, n, ["a", "b", "c"]) for n in names}
    assert {n: draw_model(7, n, ["a", "b", "c"]) for n in reversed(names)} == draws
    assert set(draws.values()) == {"a", "b", "c"}
    assert draws != {n: draw_model(8, n, ["a", "b", "c"]) for n in names}  # another batch seed, another draw
    assert image_seed(7, "x.png") == image_seed(7, "x.png") != image_seed(7, "y.png")


@pytest.mark.parametrize("name, prompt", [("a_red_dragon.png", "a red dragon"), ("blue-bird_02.jpg", "blue bird"),
                                          ("sub/cat (3).png", "cat"), ("x.y_z.png", "x y z")])
def test_prompt_from_filename(name, prompt):
    assert prompt_from_filename(name) == prompt


def test_working_size_keeps_the_aspect_in_multiples_of_8():
    assert working_size((1000, 600), 512) == (512, 304)
    assert working_size((300, 300), 512) == (512, 512)
    assert working_size((4000, 10), 512) == (512, 8)
