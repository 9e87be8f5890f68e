"""Shared fixtures: a tiny random pipeline, a small shapes dataset, odd files, a tiny CLIP, a fine-tune and the app.

Nothing here touches the network: HF_HUB_OFFLINE is set before any Hugging Face library is imported.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import FINETUNE, LORA_RUN, adapter_in_memory, run_in_process, tiny_flags  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    from tinyworld.factories import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline", seed=0)


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> Path:
    from tinyworld.shapes import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", count=24, seed=0)


@pytest.fixture
def train(tiny_pipeline, shapes_dataset):
    """Run train_text_to_image in this process: train(output_dir, *flags, data=folder) -> output_dir."""
    def run(output_dir, *extra, data=None):
        return run_in_process(tiny_flags(tiny_pipeline, data or shapes_dataset, output_dir, *extra))

    return run


# The mixed-aspect dataset's image sizes and counts, and the bucket each gets at --resolution 64 (steps of 8): batches
# of 4 make 3 + 2 + 1 = 6 an epoch, as the 24 square shapes do.
MIXED_ASPECTS = {(96, 48): (12, (80, 40)), (48, 72): (8, (48, 72)), (64, 64): (4, (64, 64))}


@pytest.fixture(scope="session")
def mixed_aspect_dataset(tmp_path_factory) -> Path:
    """24 shapes in three aspect ratios (2:1, 2:3, 1:1), for the runs with --enable_bucket."""
    import random

    from tinyworld.shapes import random_shape, write_imagefolder

    rng = random.Random(1)
    sizes = [size for size, (count, _) in MIXED_ASPECTS.items() for _ in range(count)]
    examples = []
    for size in sizes:
        image, caption = random_shape(rng)
        examples.append((image.resize(size), caption))
    return write_imagefolder(tmp_path_factory.mktemp("data") / "mixed", examples)


ODD_SKIPS = {"undecodable image": 1, "zero-byte file": 1, "missing caption": 1, "empty caption": 1}


@pytest.fixture(scope="session")
def odd_dataset(tmp_path_factory) -> Path:
    """An imagefolder with every kind of broken or unusual file a scraped dataset holds, plus good shapes."""
    import json
    import random

    import numpy as np
    from PIL import Image

    from tinyworld.shapes import random_shape

    folder = tmp_path_factory.mktemp("odd")
    rows = []
    rng = random.Random(3)
    for index in range(8):
        image, caption = random_shape(rng)
        image.save(folder / f"good{index}.png")
        rows.append({"file_name": f"good{index}.png", "text": caption})
    Image.new("CMYK", (70, 50), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((40, 60), 40000, dtype=np.uint16)).save(folder / "deep16.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(folder / "transparent.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 40), "orange").save(folder / "rotated.jpg", exif=exif.tobytes())
    Image.new("RGB", (1, 1), "blue").save(folder / "one_pixel.png")
    Image.new("P", (30, 30), 3).save(folder / "palette.gif")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "zero.png").write_bytes(b"")
    Image.new("RGB", (64, 64), "green").save(folder / "no_caption.png")
    Image.new("RGB", (64, 64), "green").save(folder / "empty_caption.png")
    rows += [
        {"file_name": "cmyk.jpg", "text": "a cyan square on a white background"},
        {"file_name": "deep16.png", "text": "a gray square on a white background"},
        {"file_name": "transparent.png", "text": "a white square on a white background"},
        {"file_name": "rotated.jpg", "text": "an orange square on a white background"},
        {"file_name": "one_pixel.png", "text": "a blue square on a blue background"},
        {"file_name": "palette.gif", "text": "a black square on a black background"},
        {"file_name": "corrupt.png", "text": "a red circle on a white background"},
        {"file_name": "zero.png", "text": "a red circle on a white background"},
        {"file_name": "no_caption.png"},
        {"file_name": "empty_caption.png", "text": "   "},
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory, tiny_pipeline) -> Path:
    """A random CLIPModel (text and vision towers) with a processor, sharing the tiny pipeline's tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from tinyworld.factories import text_config

    folder = tmp_path_factory.mktemp("clip") / "clip"
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline / "tokenizer")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=text_config(tokenizer, hidden_size=32, num_hidden_layers=2, intermediate_size=64).to_dict(),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def finetuned_pipeline(tmp_path_factory, tiny_pipeline, shapes_dataset) -> Path:
    """The tiny pipeline after a short fine-tune (helpers.FINETUNE: random flips, a validation image): same VAE and
    text encoder, different UNet. The suite's one plain full fine-tune: test_training.py checks what it wrote, the
    app, serving and batch tests serve it."""
    output = tmp_path_factory.mktemp("finetuned") / "pipeline"
    return run_in_process(tiny_flags(tiny_pipeline, shapes_dataset, output, *FINETUNE))


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_pipeline, shapes_dataset) -> Path:
    """The suite's one plain LoRA run (helpers.LORA_RUN: rank 4, alpha 8, a learning rate that changes the image in
    4 steps, a validation image); its output folder is named shapes-lora, as the kohya file is."""
    output = tmp_path_factory.mktemp("lora-run") / "shapes-lora"
    return run_in_process(tiny_flags(tiny_pipeline, shapes_dataset, output, *LORA_RUN))


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_pipeline) -> Path:
    """A saved LoRA adapter of the tiny pipeline that changes its images (random B matrices), as training saves one."""
    from sdtune.training.lora import save_adapter

    pipeline, args = adapter_in_memory(tiny_pipeline, tmp_path_factory.mktemp("lora") / "adapter", seed=0)
    save_adapter(args, pipeline.unet)
    return Path(args.output_dir)


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_pipeline, finetuned_pipeline, tiny_adapter):
    """The app, launched in this process, serving the tiny stock model, its fine-tune, a model that cannot load, a
    LoRA on the stock model (listed at scale 0.5) and a LoRA whose adapter file is corrupt."""
    from sdtune.app.launch import LAUNCH_OPTIONS
    from sdtune.app.service import Service
    from sdtune.app.ui.blocks import build_ui
    from sdtune.generation.registry import ModelRegistry, ModelSpec

    root = tmp_path_factory.mktemp("app")
    allowed = root / "input_images"
    allowed.mkdir()
    (root / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    specs = [ModelSpec("stock", str(tiny_pipeline)), ModelSpec("tuned", str(finetuned_pipeline)),
             ModelSpec("broken", str(root / "missing-model")),
             ModelSpec("lora", str(tiny_pipeline), lora=str(tiny_adapter), lora_scale=0.5),
             ModelSpec("bad-lora", str(tiny_pipeline), lora=str(root / "corrupt.safetensors"))]
    service = Service(ModelRegistry(specs, device="cpu"), root / "outputs", allowed)
    demo = build_ui(service)
    demo.queue(default_concurrency_limit=1)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True, **LAUNCH_OPTIONS)
    yield {"url": demo.local_url, "service": service, "allowed": allowed, "root": root, "demo": demo}
    demo.close()
