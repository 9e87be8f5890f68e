"""A run killed with SIGKILL after a checkpoint, then resumed, ends with the same UNet as an uninterrupted run."""

import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, subprocess_env, tiny_flags
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # three training processes a test

# Every source of randomness is on: random crop and flip, caption dropout, noise offset, EMA, a warmup-cosine
# schedule and gradient accumulation. 24 rows / batch 4 = 6 batches an epoch, 3 optimizer steps an epoch, so the
# checkpoint at step 4 falls in the middle of the second epoch.
FLAGS = ("--random_flip", "--proportion_empty_prompts", "0.2", "--noise_offset", "0.1", "--snr_gamma", "5",
         "--use_ema", "--lr_scheduler", "cosine", "--lr_warmup_steps", "3", "--gradient_accumulation_steps", "2",
         "--max_train_steps", "14", "--checkpointing_steps", "4")


def start(tiny_pipeline, data, output_dir, *extra, flags=FLAGS):
    command = [sys.executable, str(REPO / "train_text_to_image.py"),
               *tiny_flags(tiny_pipeline, data, output_dir, *flags, *extra)]
    return subprocess.Popen(command, env=subprocess_env(threads=1), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process):
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]


def kill_after_first_checkpoint(process, output_dir):
    checkpoint = output_dir / "checkpoint-4"
    deadline = time.monotonic() + 600
    while not checkpoint.exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def straight_and_resumed(tiny_pipeline, data, tmp_path, *extra, flags=FLAGS):
    """An uninterrupted run and one killed after its first checkpoint then resumed, side by side (one thread each on
    two cores); returns their output folders once both are done. `flags`: the runs' settings (FLAGS by default)."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    uninterrupted = start(tiny_pipeline, data, straight, *extra, flags=flags)
    kill_after_first_checkpoint(start(tiny_pipeline, data, interrupted, *extra, flags=flags), interrupted)
    final_outputs = ["model_index.json", "pytorch_lora_weights.safetensors"]  # a pipeline, or a LoRA run's adapter
    assert not any((interrupted / name).exists() for name in final_outputs)  # killed before writing either
    resumed = start(tiny_pipeline, data, interrupted, *extra, "--resume_from_checkpoint", "latest", flags=flags)
    finish(uninterrupted)
    finish(resumed)
    return straight, interrupted


def test_resume_after_sigkill_gives_the_same_weights_and_loss_curve(tiny_pipeline, mixed_aspect_dataset, tmp_path):
    # with aspect-ratio buckets (3 of them; batches of 4, the last of a bucket may be short) and a validation split
    _, interrupted = straight_and_resumed(tiny_pipeline, mixed_aspect_dataset, tmp_path, "--enable_bucket",
                                          "--validation_split", "0.25", "--validation_steps", "3")

    straight = load_file(str(tmp_path / "straight/unet/diffusion_pytorch_model.safetensors"))
    resumed = load_file(str(interrupted / "unet/diffusion_pytorch_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert (straight[name] == resumed[name]).all(), name
    log = (interrupted / "train.log").read_text()
    assert f"Resumed from {interrupted / 'checkpoint-4'} at step 4" in log
    assert "Aspect-ratio buckets: 3 in use" in log and "  80x40: 12" in log
    # every step's train loss and the validation losses at steps 3, 6, 9, 12 and 14 (EMA weights), before and
    # after the checkpoint
    history = (tmp_path / "straight/loss_history.jsonl").read_text()
    assert history.count("validation_loss") == 5
    assert (interrupted / "loss_history.jsonl").read_text() == history
