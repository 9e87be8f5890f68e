"""What several test modules share besides fixtures: the tiny training flags, an in-process trainer, a LoRA adapter
that changes the image, and the environment of a child process."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_flags(pipeline: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    """Flags of a few-second CPU fine-tune; `extra` flags override them (a --dataset_name or --instance_data_dir
    replaces `data`)."""
    data_flags = [] if {"--dataset_name", "--instance_data_dir"} & set(extra) else ["--train_data_dir", str(data)]
    return [
        "--pretrained_model_name_or_path", str(pipeline), *data_flags,
        "--output_dir", str(output_dir), "--resolution", "64", "--center_crop", "--train_batch_size", "4",
        "--max_train_steps", "4", "--checkpointing_steps", "1000", "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0", "--mixed_precision", "no", "--report_to", "none", "--seed", "7",
        "--validation_inference_steps", "2", *extra,
    ]


LORA = ("--lora_rank", "4", "--lora_alpha", "8")  # alpha != rank: a loader that ignored alpha would differ

VALIDATION_PROMPT = "a red circle on a white background"
# The flags of the suite's shared full fine-tune (conftest's finetuned_pipeline) and of the shared LoRA run
# (lora_run): a test that needs the same run with one flag more (more workers, gradient checkpointing) compares
# against the shared one instead of training the pair itself.
FINETUNE = ("--random_flip", "--validation_prompts", VALIDATION_PROMPT)
LORA_RUN = (*LORA, "--learning_rate", "1e-2", "--validation_prompts", VALIDATION_PROMPT)


def adapter_in_memory(tiny_pipeline, output_dir, seed: int):
    """The tiny pipeline with a LoRA adapter whose B matrices are random (training starts them at zero), and the
    arguments of its run."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sdtune.training.config import parse_args
    from sdtune.training.lora import add_training_adapter

    args = parse_args(tiny_flags(tiny_pipeline, output_dir / "data", output_dir, *LORA))
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    add_training_adapter(pipeline.unet, args)
    torch.manual_seed(seed)
    for name, parameter in pipeline.unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.3)
    return pipeline, args


def run_in_process(flags: list[str]) -> Path:
    """train_text_to_image.py with these flags, inside the test process: accelerate's process-wide state is reset
    first (private API: tests only), so each run builds its own Accelerator as it would in a new process."""
    from accelerate.state import AcceleratorState, GradientState

    from sdtune.training.config import parse_args
    from sdtune.training.loop import main

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return main(parse_args(flags))


def subprocess_env(threads: int = 1) -> dict:
    """Environment for a child process: offline, the repo importable, and a fixed thread count (2 cores here)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(REPO))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def png_header_only(path, width: int, height: int, parameters: str | None = None) -> Path:
    """A PNG that says it is width x height, with one empty image-data chunk: what a reader of headers sees of a huge
    image, in a few bytes (Pillow opens it; decoding it fails)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    text = chunk(b"tEXt", b"parameters\0" + parameters.encode("latin-1")) if parameters is not None else b""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + header + text + chunk(b"IDAT", zlib.compress(b"")) +
                           chunk(b"IEND", b""))
    return Path(path)


def within(seconds: float, function, *args):
    """function(*args), run in a daemon thread so that a call that never returns (reading a named pipe) fails the test
    instead of hanging it."""
    import threading

    outcome = {}

    def call():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # handed to the test, as if raised there
            outcome["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(function, '__name__', function)} did not return in {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def serve_in_process(root: Path, models_root: Path, pipeline: Path):
    """The app serving `pipeline` as "stock" from this process on a free local port, the way gradio_app.py launches
    it (outputs under root/outputs, folders under root, models added from under models_root); a generator for a
    fixture to yield from: {"url", "service"}, closed after."""
    from sdtune.app.launch import LAUNCH_OPTIONS
    from sdtune.app.service import Service
    from sdtune.app.ui.blocks import build_ui
    from sdtune.generation.registry import ModelRegistry, ModelSpec

    service = Service(ModelRegistry([ModelSpec("stock", str(pipeline))], device="cpu"), root / "outputs", root,
                      models_root=models_root)
    demo = build_ui(service)
    demo.queue(default_concurrency_limit=1)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True, **LAUNCH_OPTIONS)
    try:
        yield {"url": demo.local_url, "service": service}
    finally:
        demo.close()
