"""LoRA: training an adapter on the frozen tiny UNet, its two output formats, serving LoRA models on a shared base,
and bad LoRA input."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import LORA, LORA_RUN, VALIDATION_PROMPT, adapter_in_memory, run_in_process, tiny_flags
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.errors import SdtuneError
from sdtune.generation.registry import ModelRegistry, ModelSpec, ModelUnavailable, parse_model_flags, read_model_list
from sdtune.training.config import parse_args
from sdtune.training.lora import DIFFUSERS_WEIGHTS, add_training_adapter, save_adapter

PROMPT = VALIDATION_PROMPT  # the shared LoRA run's (conftest's lora_run)


def render(pipeline) -> np.ndarray:
    return pipeline(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]


def adapter_weights(folder) -> dict:
    return load_file(str(folder / DIFFUSERS_WEIGHTS))


def test_saved_adapter_gives_the_in_memory_image_in_both_formats(tiny_pipeline, tmp_path):
    base_image = render(StableDiffusionPipeline.from_pretrained(tiny_pipeline))
    pipeline, args = adapter_in_memory(tiny_pipeline, tmp_path / "my-lora", seed=0)
    in_memory = render(pipeline)
    assert np.abs(in_memory - base_image).max() > 0.05

    diffusers_file, kohya_file = save_adapter(args, pipeline.unet)
    assert kohya_file == tmp_path / "my-lora" / "my-lora.safetensors"
    for source in (diffusers_file, kohya_file):
        loaded = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
        loaded.load_lora_weights(str(source))
        assert np.abs(render(loaded) - in_memory).max() < 1e-5, source.name


def test_kohya_file_has_kohya_keys_the_trained_alpha_and_the_settings(tiny_pipeline, tmp_path):
    args = parse_args(tiny_flags(tiny_pipeline, tmp_path / "data", tmp_path / "run", *LORA))
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    add_training_adapter(pipeline.unet, args)
    _, kohya_file = save_adapter(args, pipeline.unet)
    with safe_open(str(kohya_file), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
        alphas = {f.get_tensor(key).item() for key in keys if key.endswith(".alpha")}
    assert all(key.startswith("lora_unet_") for key in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert alphas == {8.0}
    assert metadata["ss_sd_model_name"] == str(tiny_pipeline)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8.0")


def test_lora_run_saves_the_adapter_that_draws_the_validation_image(lora_run, tiny_pipeline):
    from PIL import Image

    from sdtune.generation.core import GenerationSettings, text_to_image

    out = lora_run  # helpers.LORA_RUN, in a folder named shapes-lora
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()  # no full pipeline
    assert sorted(p.name for p in out.glob("*.safetensors")) == [DIFFUSERS_WEIGHTS, "shapes-lora.safetensors"]

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    settings = GenerationSettings(num_inference_steps=2, width=64, height=64)
    base = text_to_image(pipeline, PROMPT, 7, settings)  # validation seed: --seed 7 + prompt 0
    pipeline.load_lora_weights(out)
    tuned = text_to_image(pipeline, PROMPT, 7, settings)
    assert tuned.tobytes() == Image.open(out / "validation/step-000004.png").convert("RGB").tobytes()
    assert tuned.tobytes() != base.tobytes()

    card = (out / "README.md").read_text()
    for needed in (str(tiny_pipeline), "load_lora_weights", "AUTOMATIC1111", "ComfyUI", "shapes-lora.safetensors",
                   "validation/step-000004.png"):
        assert needed in card
    assert "Saved the LoRA adapter" in (out / "train.log").read_text()


def test_adapter_trains_in_fp32_on_a_frozen_unet_held_in_the_mixed_precision_dtype(tiny_pipeline, tmp_path):
    from sdtune.training.components import load_components

    args = parse_args(tiny_flags(tiny_pipeline, tmp_path / "data", tmp_path / "run", *LORA))
    unet = load_components(args, torch.bfloat16).unet
    add_training_adapter(unet, args)
    trained = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    frozen = {name: p for name, p in unet.named_parameters() if not p.requires_grad}
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}


def test_gradient_checkpointing_trains_the_same_adapter(lora_run, tiny_pipeline, shapes_dataset, tmp_path):
    plain = adapter_weights(lora_run)
    checkpointed = adapter_weights(run_in_process(tiny_flags(tiny_pipeline, shapes_dataset, tmp_path / "checkpointed",
                                                             *LORA_RUN, "--gradient_checkpointing")))
    for key, value in plain.items():
        assert torch.allclose(value, checkpointed[key], atol=1e-6), key
    assert any(value.abs().max() > 0 for key, value in plain.items() if "lora.up" in key)  # B starts at zero


def test_every_memory_and_objective_flag_runs_with_lora_and_the_ema_covers_the_adapter_only(train, tmp_path):
    flags = (*LORA, "--mixed_precision", "bf16", "--gradient_checkpointing", "--use_8bit_adam", "--cache_latents",
             "--snr_gamma", "5", "--checkpointing_steps", "4", "--validation_split", "0.05")  # 1 held-out row
    raw = train(tmp_path / "raw", *flags)
    averaged = train(tmp_path / "ema", *flags, "--use_ema")
    raw_weights, ema_weights = adapter_weights(raw), adapter_weights(averaged)
    # the validation loss scores the weights validation images use: with --use_ema the averaged adapter, which
    # differs from the raw one that both runs train alike
    assert final_validation_loss(raw) != final_validation_loss(averaged)
    assert all(value.dtype == torch.float32 for value in ema_weights.values())
    assert max((raw_weights[key] - ema_weights[key]).abs().max() for key in raw_weights) > 0
    checkpoint = next(averaged.glob("checkpoint-*"))
    assert len(load_file(checkpoint / "unet_lora_ema.safetensors")) == len(raw_weights)  # adapter only, no UNet
    assert not (checkpoint / "unet").exists()  # the frozen base is not saved: it comes from the pretrained model


def final_validation_loss(output_dir) -> str:
    return (output_dir / "train.log").read_text().split("Validation Loss: ")[-1].split()[0]


@pytest.mark.parametrize("flags, message", [
    (("--lora_rank", "-1"), "--lora_rank -1"),
    (("--rank", "0", "--lora_alpha", "8"), "--lora_alpha: LoRA settings, but this is a full fine-tune"),
    (("--lora_dropout", "0.1", "--lora_target_modules", "to_q"), "--lora_dropout, --lora_target_modules: LoRA"),
    (("--rank", "4", "--lora_dropout", "1.5"), "--lora_dropout 1.5"),
    (("--rank", "4", "--lora_alpha", "0"), "--lora_alpha 0.0"),
    (("--rank", "4", "--lora_alpha", "nan"), "--lora_alpha nan must be a positive finite number"),
    (("--rank", "4", "--lora_alpha", "inf"), "--lora_alpha inf must be a positive finite number"),
])
def test_bad_lora_flags_are_refused_naming_the_flag(tmp_path, flags, message):
    with pytest.raises(SdtuneError, match=message):
        parse_args(tiny_flags(tmp_path / "model", tmp_path / "data", tmp_path / "run", *flags))


def test_target_modules_missing_from_the_unet_are_a_clear_error(train, tmp_path):
    with pytest.raises(SdtuneError, match="--lora_target_modules to_nothing"):
        train(tmp_path / "run", "--rank", "4", "--lora_target_modules", "to_nothing")


def test_a_rank_no_adapted_layer_can_use_is_refused_with_its_size_before_allocating(tiny_pipeline, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    largest = max(min(m.in_features, m.out_features) for name, m in unet.named_modules()
                  if name.endswith(("to_q", "to_k", "to_v", "to_out.0")))
    flags = tiny_flags(tiny_pipeline, tmp_path / "data", tmp_path / "run", "--rank", str(largest + 1))
    with pytest.raises(SdtuneError, match=rf"--lora_rank {largest + 1} is larger .* is {largest}\) and would add "
                                          r"[\d,]+ parameters: choose a rank of at most"):
        add_training_adapter(unet, parse_args(flags))
    assert not any("lora_" in name for name, _ in unet.named_parameters())  # nothing was added
    add_training_adapter(unet, parse_args(flags[:-1] + [str(largest)]))  # the largest usable rank trains


@pytest.mark.slow  # two training processes
def test_two_process_lora_run_saves_the_adapter_once(tiny_pipeline, mixed_aspect_dataset, tmp_path):
    import subprocess
    import sys

    from helpers import REPO, subprocess_env

    out = tmp_path / "ddp-lora"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "train_text_to_image.py"),
               *tiny_flags(tiny_pipeline, mixed_aspect_dataset, out, *LORA, "--use_ema", "--checkpointing_steps", "2",
                           "--validation_prompts", PROMPT, "--enable_bucket")]
    result = subprocess.run(command, env=dict(subprocess_env(threads=1), ACCELERATE_USE_CPU="true"), cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "2 process(es)" in log and log.count("Saved the LoRA adapter") == 1
    assert "Aspect-ratio buckets: 3 in use" in log  # each process's batches from one bucket, of different sizes
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    pipeline.load_lora_weights(out)
    assert np.isfinite(render(pipeline)).all()


@pytest.fixture(scope="module")
def adapters(tiny_pipeline, tmp_path_factory):
    """Two saved adapters of the tiny pipeline, with the image each draws alone: {name: (folder, image)}."""
    saved = {}
    for seed, name in enumerate(["a", "b"]):
        pipeline, args = adapter_in_memory(tiny_pipeline, tmp_path_factory.mktemp("adapters") / name, seed)
        save_adapter(args, pipeline.unet)
        saved[name] = (Path(args.output_dir), render(pipeline))
    return saved


def test_lora_models_share_one_base_pipeline_and_switch_adapters_between_requests(tiny_pipeline, adapters):
    registry = ModelRegistry([ModelSpec("stock", str(tiny_pipeline)),
                              *(ModelSpec(name, str(tiny_pipeline), lora=str(adapters[name][0])) for name in "ab")],
                             device="cpu")
    stock = registry.get("stock")
    assert registry.get("a") is stock and registry.get("b") is stock  # one pipeline, two adapters on it
    adapter_tensors = sum(len(load_file(str(adapters[name][0] / DIFFUSERS_WEIGHTS))) for name in "ab")
    assert len([n for n, _ in stock.unet.named_parameters() if "lora_" in n]) == adapter_tensors

    base_image = render(registry.get("stock"))
    for name in ["a", "b", "stock", "b", "a"]:
        image = render(registry.get(name))
        assert np.array_equal(image, base_image) if name == "stock" else \
            np.abs(image - adapters[name][1]).max() < 1e-5, name


def test_a_lora_model_at_scale_zero_draws_exactly_the_base_models_image(tiny_pipeline, adapters):
    registry = ModelRegistry([ModelSpec("stock", str(tiny_pipeline)),
                              ModelSpec("off", str(tiny_pipeline), lora=str(adapters["a"][0]), lora_scale=0.0),
                              ModelSpec("a", str(tiny_pipeline), lora=str(adapters["a"][0]))], device="cpu")
    base_image = render(registry.get("stock"))
    assert np.array_equal(render(registry.get("off")), base_image)
    assert np.array_equal(render(registry.get("a", lora_scale=0.0)), base_image)  # a per-request scale
    assert not np.array_equal(render(registry.get("a")), base_image)


def test_two_threads_on_one_base_each_get_their_own_adapters_image(tiny_pipeline, adapters):
    import threading

    from sdtune.generation.backend import LocalBackend
    from sdtune.generation.core import GenerationSettings

    registry = ModelRegistry([ModelSpec("stock", str(tiny_pipeline)),
                              *(ModelSpec(name, str(tiny_pipeline), lora=str(adapters[name][0])) for name in "ab")],
                             device="cpu")
    backend, settings = LocalBackend(registry), GenerationSettings(num_inference_steps=3, width=64, height=64)

    def draw(name):
        return backend.text_to_images(name, None, PROMPT, [0], settings)[0].tobytes()

    alone = {name: draw(name) for name in ["stock", "a", "b"]}
    assert len(set(alone.values())) == 3
    names = ["a", "b", "stock"] * 3
    start, drawn = threading.Barrier(len(names)), [None] * len(names)  # every thread switches adapters at once

    def worker(index):
        start.wait()
        drawn[index] = draw(names[index])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(names))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [image == alone[name] for name, image in zip(names, drawn)] == [True] * len(names)


def test_broken_adapters_are_unavailable_and_leave_the_others_serving(tiny_pipeline, adapters, tmp_path):
    weights = load_file(str(adapters["a"][0] / DIFFUSERS_WEIGHTS))
    # an adapter made for a wider UNet: every down projection expects 8 more input features
    save_file({key: torch.zeros(value.shape[0], value.shape[1] + 8) if "lora.down" in key else value
               for key, value in weights.items()}, str(tmp_path / "other-base.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    specs = [ModelSpec("a", str(tiny_pipeline), lora=str(adapters["a"][0])),
             *(ModelSpec(name, str(tiny_pipeline), lora=str(tmp_path / f"{name}.safetensors"))
               for name in ["missing", "corrupt", "other-base"])]
    registry = ModelRegistry(specs, device="cpu")
    assert sorted(registry.errors) == ["corrupt", "missing", "other-base"]
    assert "size mismatch" in registry.errors["other-base"] and "no LoRA adapter" in registry.errors["missing"]
    with pytest.raises(ModelUnavailable, match="other-base"):
        registry.get("other-base")
    assert np.abs(render(registry.get("a")) - adapters["a"][1]).max() < 1e-5


def test_adapters_with_missing_unexpected_or_non_finite_tensors_are_unavailable_with_the_reason(
        tiny_pipeline, adapters, tmp_path):
    weights = load_file(str(adapters["a"][0] / DIFFUSERS_WEIGHTS))
    first = sorted(weights)[0]
    damaged = {  # each drew black images at every scale, 0 included, and was listed as healthy
        "downs-only": {key: value for key, value in weights.items() if "lora.down" in key},
        "nan": {**weights, first: torch.full_like(weights[first], float("nan"))},
        "extra": {**weights, "unet.mid_block.no_such_layer.lora.down.weight": torch.zeros(4, 8),
                  "unet.mid_block.no_such_layer.lora.up.weight": torch.zeros(8, 4)},
    }
    for name, tensors in damaged.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    registry = ModelRegistry([ModelSpec("a", str(tiny_pipeline), lora=str(adapters["a"][0])),
                              *(ModelSpec(name, str(tiny_pipeline), lora=str(tmp_path / f"{name}.safetensors"))
                                for name in damaged)], device="cpu")
    assert sorted(registry.errors) == sorted(damaged)
    layers = len(weights) // 2
    assert f"{layers} layers miss their down or up projection" in registry.errors["downs-only"]
    assert f"1 tensors hold NaN or infinite values (e.g. {first})" in registry.errors["nan"]
    assert "2 keys match no layer of the base model (e.g. unet.mid_block.no_such_layer" in registry.errors["extra"]
    assert all(str(tmp_path) not in error for error in registry.errors.values())  # the app shows them
    with pytest.raises(ModelUnavailable, match="'downs-only' could not be loaded: .*damaged or made for another"):
        registry.get("downs-only")
    assert np.abs(render(registry.get("a")) - adapters["a"][1]).max() < 1e-5


def test_model_lists_and_flags_name_lora_models(tmp_path):
    listing = tmp_path / "models.yaml"
    listing.write_text("models:\n  - {name: p, path: x/y, lora: ./sd-pokemon-lora, lora_scale: 0.5}\n")
    assert read_model_list(listing) == [ModelSpec("p", "x/y", lora="./sd-pokemon-lora", lora_scale=0.5)]
    assert parse_model_flags(["p=x/y,lora=./l,lora_scale=0.8", "s=x/y"]) == \
        [ModelSpec("p", "x/y", lora="./l", lora_scale=0.8), ModelSpec("s", "x/y")]
    with pytest.raises(SdtuneError, match="unknown options"):
        parse_model_flags(["p=x/y,lroa=./l"])
    with pytest.raises(SdtuneError, match="lora_scale must be a number"):
        parse_model_flags(["p=x/y,lora=./l,lora_scale=high"])


def test_lora_recipes_and_model_lists_parse():
    from helpers import REPO

    for recipe, rank in [("pokemon-lora.yaml", 4), ("tiny-lora.yaml", 16)]:
        assert parse_args(["--config", str(REPO / "configs" / recipe)]).lora_rank == rank
    assert parse_args(["--config", str(REPO / "configs/tiny.yaml"), "--rank", "8"]).lora_rank == 8  # the alias
    for listing in ["models-lora.yaml", "models-tiny-lora.yaml"]:
        lora_models = [spec for spec in read_model_list(REPO / "configs" / listing) if spec.lora]
        assert [spec.name for spec in lora_models] == ["pokemon-lora"]


def test_the_diffusers_lora_example_command_runs_with_its_flags(train, tmp_path, tiny_pipeline):
    # train_text_to_image_lora.py's flags, meaning what they mean there: --rank turns LoRA on, one --validation_prompt,
    # --num_validation_images per prompt; checkpoints named and limited as diffusers names and limits them
    out = train(tmp_path / "run", "--rank", "4", "--validation_prompt", PROMPT, "--num_validation_images", "2",
                "--checkpointing_steps", "2", "--checkpoints_total_limit", "1")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    grid = np.asarray(Image.open(out / "validation/step-000004.png").convert("RGB"))
    assert grid.shape == (64, 128, 3)  # one row: the prompt's two images
    assert np.abs(grid[:, :64].astype(int) - grid[:, 64:].astype(int)).max() > 0  # each from its own seed
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    pipeline.load_lora_weights(out / "checkpoint-4" / "unet_lora")  # an intermediate checkpoint is a LoRA too
    assert np.isfinite(render(pipeline)).all()
