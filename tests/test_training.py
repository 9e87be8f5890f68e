"""End-to-end fine-tunes of the tiny pipeline, in this process, one flag group at a time."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from sdtune.errors import SdtuneError

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def weights(folder, name=UNET_WEIGHTS):
    return load_file(str(folder / name))


def max_difference(first: dict, second: dict) -> float:
    return max((first[key] - second[key]).abs().max().item() for key in first)


def test_fine_tune_writes_a_pipeline_that_loads_runs_and_differs_only_in_its_unet(train, tmp_path, tiny_pipeline):
    out = train(tmp_path / "run", "--validation_prompts", "a red circle on a white background")
    pipeline = StableDiffusionPipeline.from_pretrained(out)
    image = pipeline("a red circle on a white background", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    for part in ["vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]:
        assert max_difference(weights(out, part), weights(tiny_pipeline, part)) == 0.0
    assert max_difference(weights(out), weights(tiny_pipeline)) > 0.0
    card = (out / "README.md").read_text()
    assert str(tiny_pipeline) in card and "validation/step-000004.png" in card
    assert (out / "training_config.yaml").is_file() and (out / "validation/step-000004.png").is_file()
    assert "Saved the fine-tuned pipeline" in (out / "train.log").read_text()


def test_broken_and_odd_images_are_trained_through_with_the_skips_counted(train, tmp_path, odd_dataset):
    out = train(tmp_path / "run", "--random_flip", "--max_train_steps", "6", data=odd_dataset)
    log = (out / "train.log").read_text()
    skip_line = next(line for line in log.splitlines() if "Skipped" in line)
    assert "Skipped 4 of 18 rows" in skip_line
    for reason in ["1 undecodable image", "1 zero-byte file", "1 missing caption", "1 empty caption"]:
        assert reason in skip_line
    assert "on 14 rows" in log
    assert (out / "model_index.json").is_file()


def test_cached_latents_train_the_same_model_as_encoding_every_step(train, tmp_path):
    # The cache stores the latent distribution (both orientations), not a sample: same draws, same training.
    flags = ("--random_flip", "--max_train_steps", "5", "--proportion_empty_prompts", "0.3")
    encoded = train(tmp_path / "encoded", *flags)
    cached = train(tmp_path / "cached", *flags, "--cache_latents")
    assert max_difference(weights(encoded), weights(cached)) < 1e-3  # a frozen sample instead differs by ~1e-2
    assert "Cached latents and text embeddings" in (cached / "train.log").read_text()


def test_data_loader_workers_do_not_change_the_result(train, tmp_path):
    in_process = train(tmp_path / "zero", "--random_flip")
    workers = train(tmp_path / "two", "--random_flip", "--dataloader_num_workers", "2")
    assert max_difference(weights(in_process), weights(workers)) == 0.0


def test_final_pipeline_carries_the_ema_weights(train, tmp_path):
    flags = ("--checkpointing_steps", "4", "--use_8bit_adam", "--scale_lr", "--lr_scheduler", "cosine",
             "--lr_warmup_steps", "2", "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5")
    plain = train(tmp_path / "plain", *flags)
    averaged = train(tmp_path / "ema", *flags, "--use_ema", "--offload_ema")
    # the checkpoint holds the raw trained weights; the exported UNet is their average only with --use_ema
    assert max_difference(weights(plain), weights(plain / "checkpoint-000004", "model.safetensors")) == 0.0
    assert max_difference(weights(averaged), weights(averaged / "checkpoint-000004", "model.safetensors")) > 0.0
    assert (averaged / "checkpoint-000004" / "custom_checkpoint_0.pkl").is_file()  # the EMA state


def test_offloaded_ema_update_matches_diffusers(tmp_path):
    from diffusers.training_utils import EMAModel

    from sdtune.optim import update_offloaded_ema

    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    reference, offloaded = EMAModel(params, decay=0.9), EMAModel(params, decay=0.9)
    for _ in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        reference.step(params)
        update_offloaded_ema(offloaded, params)
    for a, b in zip(reference.shadow_params, offloaded.shadow_params):
        assert torch.allclose(a, b, atol=1e-6)
    assert reference.optimization_step == offloaded.optimization_step


def test_memory_flags_run_on_the_cpu(train, tmp_path):
    out = train(tmp_path / "run", "--gradient_checkpointing", "--mixed_precision", "bf16", "--allow_tf32")
    assert (out / "model_index.json").is_file()
    # master weights stay fp32 under mixed precision
    assert all(t.dtype == torch.float32 for t in weights(out).values())


def test_missing_xformers_is_a_clear_error(train, tmp_path):
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    with pytest.raises(SdtuneError, match="xformers is not installed"):
        train(tmp_path / "run", "--enable_xformers_memory_efficient_attention")


def test_diffusion_objective_flags(train, tmp_path):
    out = train(tmp_path / "run", "--snr_gamma", "5", "--noise_offset", "0.05", "--prediction_type",
                "v_prediction", "--proportion_empty_prompts", "0.2")
    scheduler = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"  # the saved pipeline samples what it was trained on


def test_validation_grids_and_tensorboard(train, tmp_path):
    out = train(tmp_path / "run", "--validation_steps", "2", "--validation_prompts", "a red circle on a white "
                "background", "a blue square on a black background", "--report_to", "tensorboard")
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"]
    assert Image.open(out / "validation/step-000004.png").size == (128, 64)  # two 64 px images side by side
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_validation_images_are_reproducible(train, tmp_path):
    first = train(tmp_path / "a", "--validation_prompts", "a red circle on a white background")
    second = train(tmp_path / "b", "--validation_prompts", "a red circle on a white background")
    assert Image.open(first / "validation/step-000004.png").tobytes() == \
        Image.open(second / "validation/step-000004.png").tobytes()


def test_checkpoint_limit_keeps_the_newest_complete_checkpoints(train, tmp_path):
    out = train(tmp_path / "run", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    assert names == ["checkpoint-000003", "checkpoint-000004"]
    state = json.loads((out / "checkpoint-000004" / "training_state.json").read_text())
    assert state["global_step"] == 4
    assert (out / "checkpoint-000004" / "training_config.yaml").is_file()


def test_push_to_hub_offline_fails_before_any_training(train, tmp_path):
    with pytest.raises(SdtuneError, match="HF_HUB_OFFLINE"):
        train(tmp_path / "run", "--push_to_hub", "--checkpointing_steps", "1")
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_hub_style_dataset_folder_with_renamed_columns_and_sample_cap(train, tmp_path, shapes_dataset):
    data = tmp_path / "renamed"
    shutil.copytree(shapes_dataset, data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    (data / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": r["file_name"], "caption": r["text"]}) + "\n" for r in rows))
    out = train(tmp_path / "run", "--dataset_name", str(data), "--caption_column", "caption", "--max_train_samples", "10")
    assert "on 10 rows" in (out / "train.log").read_text()
