"""Two training processes on the CPU through `accelerate launch`: the result is saved once and loads.

accelerate 1.x's `--cpu --num_processes 2` starts one process unless MPI is installed; torchrun-style launching with
ACCELERATE_USE_CPU gives two gloo processes, the same code path as several GPUs.
"""

import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import REPO, subprocess_env, tiny_flags


@pytest.mark.slow  # two training processes
def test_two_process_run_saves_one_loadable_pipeline(tiny_pipeline, shapes_dataset, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "train_text_to_image.py"),
               *tiny_flags(tiny_pipeline, shapes_dataset, out, "--checkpointing_steps", "2", "--use_ema",
                           "--validation_prompts", "a red circle on a white background", "--validation_split", "0.25")]
    result = subprocess.run(command, env=dict(subprocess_env(threads=1), ACCELERATE_USE_CPU="true"), cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    log = (out / "train.log").read_text()
    assert "2 process(es)" in log
    assert log.count("Saved the fine-tuned pipeline") == 1
    assert log.count("Validation Loss") == 1  # on the main process, at the end
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # accelerate keeps one RNG state per process in each checkpoint
    assert sorted(p.name for p in (out / "checkpoint-4").glob("random_states_*")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]
    pipeline = StableDiffusionPipeline.from_pretrained(out)
    image = pipeline("a red circle", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
