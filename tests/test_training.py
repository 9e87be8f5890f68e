"""End-to-end fine-tunes of the tiny pipeline, in this process, one flag group at a time; the flags' effects are
watched inside the run (tests/test_training_flags.py checks them against hand computations)."""

import json
import shutil
from dataclasses import dataclass, field

import pytest
import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from helpers import run_in_process, tiny_flags
from PIL import Image
from safetensors.torch import load_file

import sdtune.training.loop
from sdtune.errors import SdtuneError

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def weights(folder, name=UNET_WEIGHTS):
    return load_file(str(folder / name))


def max_difference(first: dict, second: dict) -> float:
    return max((first[key] - second[key]).abs().max().item() for key in first)


def checkpoint_unet(output_dir, subfolder) -> dict:
    return UNet2DConditionModel.from_pretrained(output_dir, subfolder=subfolder).state_dict()


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


def test_cached_latents_train_the_same_model_as_encoding_every_step(train, tmp_path, mixed_aspect_dataset, odd_dataset):
    # The cache stores the latent distribution (both orientations), not a sample: same draws, same training. With
    # aspect-ratio buckets, so the cache holds three latent shapes, and a validation folder.
    flags = ("--random_flip", "--max_train_steps", "5", "--proportion_empty_prompts", "0.3", "--enable_bucket",
             "--validation_data_dir", str(odd_dataset))
    encoded = train(tmp_path / "encoded", *flags, data=mixed_aspect_dataset)
    cached = train(tmp_path / "cached", *flags, "--cache_latents", data=mixed_aspect_dataset)
    assert max_difference(weights(encoded), weights(cached)) < 1e-3  # a frozen sample instead differs by ~1e-2
    log = (cached / "train.log").read_text()
    assert "Cached latents and text embeddings" in log
    assert f"Validation loss on {odd_dataset}: Skipped 4 of 18 rows" in log  # screened as training rows are
    # the held-out rows are encoded before the VAE leaves the device: the same figure either way
    assert validation_losses(cached) == pytest.approx(validation_losses(encoded), rel=1e-3)


def validation_losses(output_dir) -> list[float]:
    lines = (output_dir / "loss_history.jsonl").read_text().splitlines()
    return [record["validation_loss"] for record in map(json.loads, lines) if "validation_loss" in record]


def test_data_loader_workers_do_not_change_the_result(train, tmp_path):
    in_process = train(tmp_path / "zero", "--random_flip")
    workers = train(tmp_path / "two", "--random_flip", "--dataloader_num_workers", "2")
    assert max_difference(weights(in_process), weights(workers)) == 0.0


@dataclass
class TrainingWatch:
    """What a training run did, seen from outside: its loss calls, gradient clips, gathers and logged steps."""
    loss_calls: list = field(default_factory=list)  # (unet, weight_dtype) of each micro-batch
    clips: list = field(default_factory=list)  # (max_norm, norm before, norm after) of each optimizer step
    logged: list = field(default_factory=list)  # (step, values) sent to the trackers
    losses: list = field(default_factory=list)  # each micro-batch's loss
    gathers: int = 0  # accelerator.gather calls

    def observe(self, patch: pytest.MonkeyPatch) -> "TrainingWatch":
        """Wrap the training step's loss, accelerate's clipping, gather and tracker log for the rest of `patch`."""
        loss, clip, log = sdtune.training.loop.diffusion_loss, Accelerator.clip_grad_norm_, Accelerator.log
        gather = Accelerator.gather

        def watched_loss(batch, unet, parts, generator, weight_dtype, **settings):
            self.loss_calls.append((unet, weight_dtype))
            value = loss(batch, unet, parts, generator, weight_dtype, **settings)
            self.losses.append(value.item())
            return value

        def watched_gather(accelerator, tensor):
            self.gathers += 1
            return gather(accelerator, tensor)

        def watched_clip(accelerator, parameters, max_norm, *rest, **options):
            parameters = list(parameters)
            before = clip(accelerator, parameters, max_norm, *rest, **options)
            after = torch.stack([p.grad.norm() for p in parameters if p.grad is not None]).norm()
            self.clips.append((max_norm, before.item(), after.item()))
            return before

        def watched_log(accelerator, values, step=None, **options):
            self.logged.append((step, dict(values)))
            return log(accelerator, values, step=step, **options)

        patch.setattr(sdtune.training.loop, "diffusion_loss", watched_loss)
        patch.setattr(Accelerator, "clip_grad_norm_", watched_clip)
        patch.setattr(Accelerator, "log", watched_log)
        patch.setattr(Accelerator, "gather", watched_gather)
        return self


OPTIMISATION_FLAGS = ("--checkpointing_steps", "4", "--use_8bit_adam", "--scale_lr", "--lr_scheduler", "cosine",
                      "--lr_warmup_steps", "2", "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5")


@pytest.fixture(scope="module")
def optimisation_runs(tmp_path_factory, tiny_pipeline, shapes_dataset):
    """The optimisation flags' run, watched, and the same run with an offloaded EMA."""
    folder = tmp_path_factory.mktemp("optimisation")
    with pytest.MonkeyPatch.context() as patch:
        watch = TrainingWatch().observe(patch)
        plain = run_in_process(tiny_flags(tiny_pipeline, shapes_dataset, folder / "plain", *OPTIMISATION_FLAGS))
    averaged = run_in_process(tiny_flags(tiny_pipeline, shapes_dataset, folder / "ema", *OPTIMISATION_FLAGS,
                                         "--use_ema", "--offload_ema"))
    return plain, averaged, watch


def test_accumulation_clipping_and_the_scaled_cosine_learning_rate_act_in_training(optimisation_runs):
    *_, watch = optimisation_runs
    # 4 optimizer steps of 2 accumulated micro-batches each
    assert len(watch.loss_calls) == 8
    assert [step for step, _ in watch.logged] == [1, 2, 3, 4] and len(watch.clips) == 4
    # every step clipped to --max_grad_norm, and at least one step needed it
    assert all(max_norm == 0.5 and after <= 0.5 * (1 + 1e-4) for max_norm, _, after in watch.clips)
    assert any(before > 0.5 for _, before, _ in watch.clips)
    # the rate logged after steps 1-4: 1e-3 x batch 4 x accumulation 2 = 8e-3, times a linear warmup over 2 steps
    # (1/2, 1) and then half a cosine over the 2 others ((1 + cos(pi/2)) / 2, (1 + cos(pi)) / 2)
    rates = [values["lr"] for _, values in watch.logged]
    assert rates == pytest.approx([4e-3, 8e-3, 4e-3, 0.0], abs=1e-12)


def test_the_logged_loss_is_the_mean_of_each_steps_micro_batches_gathered_once_a_step(optimisation_runs):
    *_, watch = optimisation_runs
    assert watch.gathers == 4  # one CPU-GPU sync per optimizer step, not one per micro-batch
    step_means = [(first + second) / 2 for first, second in zip(watch.losses[::2], watch.losses[1::2])]
    assert [values["train_loss"] for _, values in watch.logged] == pytest.approx(step_means, rel=1e-6)


def test_final_pipeline_carries_the_ema_weights(optimisation_runs):
    plain, averaged, _ = optimisation_runs
    # checkpoint-4/unet is the raw trained weights, a diffusers model; the exported UNet is their average only with
    # --use_ema, and checkpoint-4/unet_ema is that average
    raw = checkpoint_unet(plain, "checkpoint-4/unet")
    assert max_difference(weights(plain), raw) == 0.0
    assert max_difference(checkpoint_unet(averaged, "checkpoint-4/unet"), raw) == 0.0
    assert max_difference(weights(averaged), raw) > 0.0
    assert max_difference(weights(averaged), checkpoint_unet(averaged, "checkpoint-4/unet_ema")) == 0.0
    for checkpoint in [plain / "checkpoint-4", averaged / "checkpoint-4"]:  # the weights are not stored twice
        assert not list(checkpoint.glob("model*.safetensors")) and not list(checkpoint.glob("custom_checkpoint*"))


def test_offloaded_ema_update_matches_diffusers(tmp_path):
    from diffusers.training_utils import EMAModel

    from sdtune.training.optim import update_offloaded_ema

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


def test_memory_flags_run_on_the_cpu(train, tmp_path, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False  # for the run to turn on; it changes nothing on the CPU
    watch = TrainingWatch().observe(monkeypatch)
    out = train(tmp_path / "run", "--gradient_checkpointing", "--mixed_precision", "bf16", "--allow_tf32")
    assert (out / "model_index.json").is_file()
    assert torch.backends.cuda.matmul.allow_tf32
    assert watch.loss_calls and all(unet.is_gradient_checkpointing and dtype == torch.bfloat16
                                    for unet, dtype in watch.loss_calls)
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
    # the flags' effects on the loss and the captions: tests/test_training_flags.py; here they train together
    out = train(tmp_path / "run", "--snr_gamma", "5", "--noise_offset", "0.05", "--prediction_type",
                "v_prediction", "--proportion_empty_prompts", "0.2")
    scheduler = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"  # the saved pipeline samples what it was trained on


def test_validation_grids_loss_and_tensorboard(train, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train(tmp_path / "run", "--validation_steps", "2", "--validation_prompts", "a red circle on a white "
                "background", "a blue square on a black background", "--report_to", "tensorboard",
                "--validation_split", "0.25")
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"]
    assert Image.open(out / "validation/step-000004.png").size == (128, 64)  # two 64 px images side by side

    log = (out / "train.log").read_text()
    assert "6 of 24 usable rows held out of training" in log and "on 18 rows" in log
    logged = [float(line.split("Validation Loss: ")[1].split()[0]) for line in log.splitlines()
              if "Validation Loss" in line]
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = [(event.step, event.value) for event in events.Scalars("validation_loss")]
    assert [step for step, _ in scalars] == [2, 4]
    assert [value for _, value in scalars] == pytest.approx(logged, abs=1e-4)  # train.log has 4 decimals
    card = (out / "README.md").read_text()
    assert "![train and validation loss](loss_curve.png)" in card and (out / "loss_curve.png").is_file()
    lowest_step = min(scalars, key=lambda scalar: scalar[1])[0]
    assert f"Lowest validation loss: {min(validation_losses(out)):.4f} at step {lowest_step}" in card


def test_validation_images_are_reproducible(train, tmp_path):
    first = train(tmp_path / "a", "--validation_prompts", "a red circle on a white background")
    second = train(tmp_path / "b", "--validation_prompts", "a red circle on a white background")
    assert Image.open(first / "validation/step-000004.png").tobytes() == \
        Image.open(second / "validation/step-000004.png").tobytes()


def test_checkpoint_limit_keeps_the_newest_complete_checkpoints(train, tmp_path):
    out = train(tmp_path / "run", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    assert names == ["checkpoint-3", "checkpoint-4"]
    state = json.loads((out / "checkpoint-4" / "training_state.json").read_text())
    assert state["global_step"] == 4
    assert (out / "checkpoint-4" / "training_config.yaml").is_file()


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
