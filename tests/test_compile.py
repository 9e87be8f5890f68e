"""--compile: the compiled UNet draws the uncompiled model's images, and neither a scheduler nor a LoRA model or
scale change recompiles it. One compile, shared by the file (45 s of inductor on 2 cores when its cache
is cold), is what these tests cost."""

import numpy as np
import pytest
import torch
import torch._dynamo
from diffusers import StableDiffusionPipeline
from helpers import adapter_in_memory, run_in_process, tiny_flags
from torch._dynamo.utils import counters

from sdtune.generation.core import GenerationSettings, text_to_images
from sdtune.generation.registry import ModelRegistry, ModelSpec
from sdtune.generation.schedulers import SCHEDULERS
from sdtune.training.lora import save_adapter

PROMPT = "a red circle on a white background"
pytestmark = pytest.mark.slow  # a cold inductor compile


@pytest.fixture(scope="module")
def specs(tiny_pipeline, tiny_adapter, tmp_path_factory):
    """The tiny pipeline, and two LoRA models on it with different adapters."""
    pipeline, args = adapter_in_memory(tiny_pipeline, tmp_path_factory.mktemp("lora") / "second", seed=1)
    save_adapter(args, pipeline.unet)
    return [ModelSpec("stock", str(tiny_pipeline)),
            ModelSpec("lora", str(tiny_pipeline), lora=str(tiny_adapter), lora_scale=0.5),
            ModelSpec("second", str(tiny_pipeline), lora=str(args.output_dir))]


@pytest.fixture(scope="module")
def registries(specs):
    """(uncompiled, compiled) registries of the same models; the compiled one has drawn once (its compile)."""
    torch._dynamo.reset()
    compiled = ModelRegistry(specs, device="cpu", compile=True)
    draw(compiled, "stock")
    return ModelRegistry(specs, device="cpu"), compiled


def draw(registry, name, lora_scale=None, scheduler="dpmsolver++") -> np.ndarray:
    settings = GenerationSettings(num_inference_steps=2, width=64, height=64, scheduler=scheduler)
    return np.asarray(text_to_images(registry.get(name, lora_scale), PROMPT, [0], settings)[0], dtype=np.int16)


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name, lora_scale", [("stock", None), ("lora", None), ("second", 0.8)])
def test_compiled_images_equal_the_uncompiled_ones_within_2_levels(registries, name, lora_scale):
    eager, compiled = registries
    expected = draw(eager, name, lora_scale)
    assert np.abs(draw(compiled, name, lora_scale) - expected).max() <= 2
    if name != "stock":  # the adapter is really in use
        assert np.abs(draw(compiled, "stock") - expected).max() > 10


def test_no_recompile_on_a_scheduler_lora_model_or_scale_change(registries):
    _, compiled = registries
    graphs = compiled_graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for scheduler in SCHEDULERS:  # their timesteps come as int64 or float32 tensors
            draw(compiled, "stock", scheduler=scheduler)
        for name, scale in [("lora", None), ("lora", 1.0), ("second", 0.3), ("stock", None), ("lora", 0.0)]:
            draw(compiled, name, scale)
    assert compiled_graphs() == graphs


def test_training_with_compile_saves_a_pipeline_that_loads(tiny_pipeline, shapes_dataset, tmp_path, monkeypatch):
    # aot_eager: the same capture, in-place wrapping and unwrapping as inductor, without a second minute of C++
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module: compile_module(module, backend="aot_eager"))
    torch._dynamo.reset()
    graphs = compiled_graphs()
    output = run_in_process(tiny_flags(tiny_pipeline, shapes_dataset, tmp_path / "run", "--compile",
                                       "--max_train_steps", "2"))
    assert compiled_graphs() > graphs  # the training steps ran compiled
    pipeline = StableDiffusionPipeline.from_pretrained(output)
    trained = pipeline.unet.state_dict()
    assert not any("_orig_mod" in key for key in trained)
    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline).unet.state_dict()
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)
