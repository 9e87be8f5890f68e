"""The serving layer without the UI: shared weights, safetensors only, PNG parameters, Stop, seeds of a batch."""

import argparse
import shutil
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdtune.app.service import RequestError, Service
from sdtune.data.folders import InputImage
from sdtune.data.prompts import prompt_from_filename
from sdtune.errors import SdtuneError
from sdtune.generation.core import GenerationError, GenerationSettings, Interrupted, text_to_images, working_size
from sdtune.generation.pnginfo import format_parameters, parse_parameters, read_parameters, save_png
from sdtune.generation.registry import ModelRegistry, ModelSpec, parse_model_flags, read_model_list
from sdtune.generation.runlog import SAMPLER_THREAD
from sdtune.limits import DEFAULT_MAX_REQUEST_COST, check_seed
from sdtune.seeds import draw_model, image_seed, resolve_seed


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


@pytest.mark.parametrize("values, setting", [
    ({"num_inference_steps": 0}, "num_inference_steps"), ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"guidance_scale": float("nan")}, "guidance_scale"), ({"guidance_scale": float("inf")}, "guidance_scale"),
    ({"guidance_scale": -1}, "guidance_scale"), ({"guidance_scale": "lots"}, "guidance_scale"),
    ({"strength": 0}, "strength"), ({"strength": 1.5}, "strength"), ({"strength": float("nan")}, "strength"),
    ({"width": 100}, "width"), ({"height": 2048}, "height"), ({"scheduler": "lms"}, "scheduler"),
])
def test_settings_refuse_what_cannot_work_and_name_the_setting(values, setting):
    with pytest.raises(GenerationError, match=setting) as refused:
        GenerationSettings.from_args(**values)
    assert isinstance(refused.value, SdtuneError)


def test_settings_from_command_line_args_ignore_other_flags():
    args = argparse.Namespace(input="in", seed=3, num_inference_steps=4.0, guidance_scale=2, scheduler="ddim",
                              strength=0.5, negative_prompt="", width=None)
    settings = GenerationSettings.from_args(args, height=64)
    assert settings == GenerationSettings(num_inference_steps=4, guidance_scale=2.0, width=512, height=64,
                                          negative_prompt=None, scheduler="ddim", strength=0.5)
    settings.validate(image_to_image=True)
    with pytest.raises(GenerationError, match="no denoising step"):
        replace(settings, strength=0.2).validate(image_to_image=True)  # 4 x 0.2 rounds down to 0 steps


@pytest.mark.parametrize("seed", [2**32, 2**64, -2, 1.5, float("nan")])
def test_seeds_outside_the_documented_range_are_refused(seed):
    with pytest.raises(SdtuneError, match="seed must be a whole number"):
        check_seed(seed)
    with pytest.raises(SdtuneError, match=r"seed must be a whole number from 0 to 4294967295.*-1"):
        resolve_seed(seed)


def test_minus_one_draws_a_seed_in_range():
    assert check_seed(2**32 - 1) == 2**32 - 1 and check_seed(0) == 0
    assert all(0 <= resolve_seed(-1) < 2**32 for _ in range(20))


@pytest.fixture
def service(tiny_pipeline, tmp_path):
    allowed = tmp_path / "input_images"
    allowed.mkdir()
    return Service(ModelRegistry([ModelSpec("stock", str(tiny_pipeline))], device="cpu"), tmp_path / "out", allowed)


SMALL = GenerationSettings(num_inference_steps=4, width=64, height=64)


def test_seeds_are_refused_by_every_request_before_any_generation(service, tmp_path):
    upload = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(upload)
    with pytest.raises(SdtuneError, match="seed must be"):
        service.text2img("x", "stock", 2**32 + 5, 1, SMALL)  # was silently the image of seed 5
    with pytest.raises(SdtuneError, match="seed must be"):
        service.img2img(upload, "x", "stock", 2**64, SMALL)  # was torch's "Overflow when unpacking long long"
    with pytest.raises(SdtuneError, match="seed must be"):
        next(service.random_batch([InputImage("in.png", upload)], ["stock"], "", 2**32, SMALL))
    assert not service.run_log.exists()


def test_a_request_costing_more_than_the_limit_is_refused_with_both_figures(service, tmp_path):
    assert service.max_request_cost == DEFAULT_MAX_REQUEST_COST["cpu"] < DEFAULT_MAX_REQUEST_COST["cuda"]
    big = GenerationSettings(num_inference_steps=100, width=1024, height=1024)
    with pytest.raises(RequestError, match=r"costs 839 megapixel-steps .* allows 8 per request on its cpu"):
        service.text2img("x", "stock", 1, 8, big)  # the documented caps: 1024^2 x 100 steps x 8 images
    upload = tmp_path / "in.png"
    Image.new("RGB", (100, 50), "red").save(upload)
    service.max_request_cost = 0.008  # the operator's --max_request_cost
    # image to image at a working size of 64x32 runs 4 x 0.5 = 2 steps: 0.0041 megapixel-steps, under the limit
    assert service.img2img(upload, "x", "stock", 1, replace(SMALL, strength=0.5), resolution=64).seeds == [1]
    with pytest.raises(RequestError, match=r"costs 0.0164 megapixel-steps .* allows 0.008"):
        service.text2img("x", "stock", 1, 1, SMALL)  # 64 x 64 x 4 steps
    with pytest.raises(RequestError, match="costs 0.0123"):  # each image of a batch at 64x64 x 4 x 0.75 steps
        next(service.random_batch([InputImage("in.png", upload)], ["stock"], "", 0, SMALL, resolution=64))


def sampler_threads() -> int:
    return sum(thread.name == SAMPLER_THREAD and thread.is_alive() for thread in threading.enumerate())


def test_stopped_and_failed_requests_leave_no_sampler_thread(service, tmp_path):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        service.text2img("x", "stock", 1, 1, SMALL, stop)
    service.output_dir = tmp_path / "a-file"
    service.output_dir.write_text("not a folder")
    with pytest.raises(OSError):
        service.text2img("x", "stock", 1, 1, SMALL)  # fails after generating, saving its PNG
    assert sampler_threads() == 0


def test_error_messages_show_the_users_names_not_server_paths(tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "input_images").mkdir()
    service = Service(ModelRegistry([ModelSpec("stock", str(tiny_pipeline))], device="cpu"), "out", "input_images")
    with pytest.raises(RequestError) as outside:
        service.folder_items("../")
    assert "input_images" in str(outside.value) and str(tmp_path) not in str(outside.value)
    upload = tmp_path / "gradio" / "0123abcd" / "notes.png"  # where Gradio keeps an upload
    upload.parent.mkdir(parents=True)
    upload.write_text("not an image")
    with pytest.raises(RequestError) as undecodable:
        service.load_upload(upload)
    assert "notes.png" in str(undecodable.value) and "0123abcd" not in str(undecodable.value)


@pytest.fixture(scope="module")
def lora_service(tiny_pipeline, tiny_adapter, tmp_path_factory):
    """The stock model and a LoRA on it, listed at scale 0.5."""
    specs = [ModelSpec("stock", str(tiny_pipeline)),
             ModelSpec("lora", str(tiny_pipeline), lora=str(tiny_adapter), lora_scale=0.5)]
    folder = tmp_path_factory.mktemp("lora-service")
    return Service(ModelRegistry(specs, device="cpu"), folder / "out", folder)


def test_a_requests_lora_scale_is_used_recorded_and_gone_with_it(lora_service):
    def draw(model, **scale):
        outcome = lora_service.text2img("a red circle", model, 3, 1, SMALL, **scale)
        parameters = parse_parameters(read_parameters(outcome.paths[0]))
        return np.asarray(Image.open(outcome.paths[0])), parameters.get("LoRA scale"), outcome.run["lora_scale"]

    stock, listed, off = draw("stock"), draw("lora"), draw("lora", lora_scale=0)
    assert np.array_equal(off[0], stock[0]) and not np.array_equal(listed[0], stock[0])
    assert (stock[1:], listed[1:], off[1:]) == ((None, None), ("0.5", 0.5), ("0.0", 0.0))  # PNG, run log
    stronger = draw("lora", lora_scale=1.5)
    assert not np.array_equal(stronger[0], listed[0]) and stronger[1:] == ("1.5", 1.5)
    # a request that gives no scale gets the listed one, whatever the request before it set
    assert np.array_equal(draw("lora")[0], listed[0]) and np.array_equal(draw("stock")[0], stock[0])


def test_bad_lora_scales_are_refused_naming_the_setting(lora_service, tmp_path):
    upload = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(upload)
    for scale in [float("nan"), float("inf"), 2.5, -3, "strong"]:
        with pytest.raises(SdtuneError, match="lora_scale must be a number from -2 to 2"):
            lora_service.text2img("x", "lora", 1, 1, SMALL, lora_scale=scale)
        with pytest.raises(SdtuneError, match="lora_scale must be a number from -2 to 2"):
            lora_service.img2img(upload, "x", "lora", 1, SMALL, lora_scale=scale)
    with pytest.raises(RequestError, match="'stock' has no adapter"):
        lora_service.text2img("x", "stock", 1, 1, SMALL, lora_scale=0.5)
    with pytest.raises(SdtuneError, match="Model 'p': lora_scale must be a number"):
        parse_model_flags(["p=x/y,lora=./l,lora_scale=nan"])  # the listed scale is the UI's default: same range
