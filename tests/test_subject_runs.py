"""Subject training (DreamBooth) end to end: the tiny world's recipe, a full fine-tune of the UNet and the text
encoder, and buckets with --cache_latents on instance and class images. Each trains a few steps (slow)."""

import pytest
import torch
import yaml
from helpers import REPO, run_in_process
from safetensors.torch import load_file
from test_subject_flags import write_images
from test_training import max_difference, weights

from tinyworld import STOCK
from tinyworld.datasets import SUBJECT_INSTANCES, write_subject

TINY_RECIPE = REPO / "configs" / "tiny-dreambooth-lora.yaml"


@pytest.fixture(scope="module")
def subject_world(tmp_path_factory):
    """The tiny world's seventh species: subject/zxq (the instance pictures) and subject/heldout."""
    return write_subject(tmp_path_factory.mktemp("tinyworld"), seed=0)


@pytest.mark.slow
def test_the_tiny_dreambooth_recipe_draws_class_images_and_trains_both_adapters(subject_world, tmp_path):
    # the recipe as it is, but from the shipped stock model (make demo's fine-tune may not exist), a few steps and
    # 6 class images
    output, classes = tmp_path / "run", tmp_path / "class"
    run_in_process(["--config", str(TINY_RECIPE), "--pretrained_model_name_or_path", str(STOCK),
                    "--instance_data_dir", str(subject_world / "zxq"), "--class_data_dir", str(classes),
                    "--num_class_images", "6", "--sample_batch_size", "6", "--max_train_steps", "3",
                    "--checkpointing_steps", "2", "--validation_steps", "3", "--validation_inference_steps", "2",
                    "--output_dir", str(output)])
    assert len(list((subject_world / "zxq").glob("*.png"))) == SUBJECT_INSTANCES
    assert sorted(path.name for path in classes.glob("*.png")) == [f"class-0000{i}.png" for i in range(6)]
    adapter = load_file(str(output / "pytorch_lora_weights.safetensors"))
    for model in ("unet", "text_encoder"):
        # the up (B) matrices start at zero: peft's lora_B, diffusers' lora.up / lora_linear_layer.up
        trained = [value for key, value in adapter.items()
                   if key.startswith(f"{model}.") and ("lora_B" in key or ".up." in key)]
        assert trained and all(value.abs().max() > 0 for value in trained), model
    kohya = load_file(str(output / "run.safetensors"))
    assert any(key.startswith("lora_te_") for key in kohya) and any(key.startswith("lora_unet_") for key in kohya)
    assert (output / "checkpoint-2").is_dir() and (output / "validation" / "step-000003.png").is_file()
    settings = yaml.safe_load((output / "training_config.yaml").read_text())
    assert settings["lora_rank"] == 16 and settings["with_prior_preservation"] and settings["train_text_encoder"]
    assert settings["instance_prompt"] == "a drawing of a zxq creature"


@pytest.mark.slow
def test_a_full_dreambooth_run_trains_and_saves_the_unet_and_the_text_encoder(train, tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    instance, classes = write_images(tmp_path / "instance", 4), write_images(tmp_path / "class", 4, prefix="c")
    output = train(tmp_path / "full", "--instance_data_dir", str(instance), "--instance_prompt", "a red circle",
                   "--with_prior_preservation", "--class_data_dir", str(classes), "--class_prompt", "a circle",
                   "--num_class_images", "4", "--train_text_encoder", "--max_train_steps", "2",
                   "--checkpointing_steps", "2")
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert max_difference(weights(output, part), weights(tiny_pipeline, part)) > 0.0, part
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert max_difference(weights(output, vae), weights(tiny_pipeline, vae)) == 0.0
    checkpoint = output / "checkpoint-2"
    assert (checkpoint / "unet").is_dir() and (checkpoint / "text_encoder").is_dir()
    pipeline = StableDiffusionPipeline.from_pretrained(output)
    image = pipeline("a red circle", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


@pytest.mark.slow
def test_cached_latents_of_bucketed_instance_and_class_images_train_as_encoding_every_step(train, tiny_pipeline,
                                                                                          tmp_path,
                                                                                          mixed_aspect_dataset):
    # three aspect ratios of instance images, so three buckets; square class images, each cropped to its paired
    # instance image's bucket and cached at that size
    classes = write_images(tmp_path / "class", 6, prefix="c")
    flags = ("--instance_data_dir", str(mixed_aspect_dataset), "--instance_prompt", "a red circle",
             "--with_prior_preservation", "--class_data_dir", str(classes), "--class_prompt", "a circle",
             "--num_class_images", "6", "--enable_bucket", "--random_flip", "--max_train_steps", "3")
    encoded = train(tmp_path / "encoded", *flags)
    cached = train(tmp_path / "cached", *flags, "--cache_latents")
    # the cache holds the latent distribution, not a sample: the same draws, the same training (test_training.py's
    # bound; a frozen sample differs by ~1e-2)
    assert max_difference(weights(encoded), weights(cached)) < 1e-3
    assert max_difference(weights(cached), weights(tiny_pipeline)) > 1e-3
    assert "Cached latents and text embeddings" in (cached / "train.log").read_text()
