"""Subject training (DreamBooth) below the training loop: the instance and class examples and their batch, the
prior-preservation loss against a hand computation, and class images drawn by the tiny pipeline (seeded, resumable,
refused when drawn with other settings)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from test_subject_flags import MODEL, write_images

from sdtune.data.subject import class_images, instance_images
from sdtune.data.subject_dataset import SubjectImages
from sdtune.errors import SdtuneError
from sdtune.generation.core import GenerationSettings
from sdtune.training.class_images import RECORD_NAME, fill_class_folder, generate_class_images, missing_indices
from sdtune.training.config import parse_args
from sdtune.training.objective import diffusion_loss

PROMPTS = {"a photo of sks dog": 1, "a photo of a dog": 2, "": 0}


class PromptIds:
    """Stands in for the tokenizer: a prompt's ids are its number in PROMPTS, repeated."""

    model_max_length = 4

    def __call__(self, caption, **_):
        return SimpleNamespace(input_ids=torch.full((1, 4), PROMPTS[caption]))


def subject_dataset(tmp_path, *flags, instance_sizes=((24, 24), (24, 24)), classes=3):
    instance = tmp_path / "instance"
    instance.mkdir()
    for index, size in enumerate(instance_sizes):
        Image.new("RGB", size, (50 * index, 0, 0)).save(instance / f"i{index}.png")
    class_dir = write_images(tmp_path / "class", classes, prefix="c")
    args = parse_args([*MODEL, "--instance_data_dir", str(instance), "--instance_prompt", "a photo of sks dog",
                       "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt",
                       "a photo of a dog", "--resolution", "16", "--center_crop", *flags])
    return SubjectImages(instance_images(instance), class_images(class_dir, args.num_class_images), args, PromptIds())


def test_a_batch_is_the_instance_half_then_the_class_half(tmp_path):
    dataset = subject_dataset(tmp_path)
    assert len(dataset) == 3  # max(2 instance images, 3 class images)
    batch = dataset.collate([dataset[(0, position)] for position in range(3)])
    assert batch["pixel_values"].shape == (6, 3, 16, 16)
    assert batch["input_ids"][:, 0].tolist() == [1, 1, 1, 2, 2, 2]
    reds = batch["pixel_values"][:, 0, 0, 0]
    # position p pairs instance p mod 2 (red 0, 50, 0) with class image p (red 0, 40, 80)
    expected = [0, 50, 0, 0, 40, 80]
    assert torch.allclose(reds, torch.tensor(expected) / 127.5 - 1.0)


def test_without_prior_preservation_a_batch_holds_instances_only(tmp_path):
    dataset = subject_dataset(tmp_path)
    dataset.classes = None
    batch = dataset.collate([dataset[(0, 0)], dataset[(0, 1)]])
    assert batch["input_ids"][:, 0].tolist() == [1, 1]


def test_under_buckets_a_class_image_takes_its_instance_images_bucket(tmp_path):
    dataset = subject_dataset(tmp_path, "--enable_bucket", instance_sizes=((48, 24), (24, 24)))
    wide, square = dataset.buckets[0], dataset.buckets[1]
    assert wide[0] > wide[1] and square[0] == square[1]
    for position in range(3):
        example = dataset[(0, position)]
        width, height = dataset.buckets[position]
        assert example["instance"]["pixel_values"].shape == example["class"]["pixel_values"].shape == (3, height,
                                                                                                         width)


class ZeroUNet:
    def __call__(self, noisy_latents, timesteps, encoder_hidden_states, return_dict=False):
        self.noisy_latents, self.timesteps = noisy_latents, timesteps
        return (torch.zeros_like(noisy_latents),)


def test_prior_loss_is_the_instance_loss_plus_the_weighted_class_loss():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    parts = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0)),
                            noise_scheduler=scheduler, text_encoder=None)
    latents = torch.zeros(8, 4, 8, 8)  # zero latents: the noisy latents are sqrt(1 - alpha_bar) x the noise
    batch = {"latent_mean": latents, "latent_std": torch.zeros_like(latents),
             "encoder_hidden_states": torch.zeros(8, 77, 32)}
    unet = ZeroUNet()
    loss = diffusion_loss(batch, unet, parts, torch.Generator().manual_seed(0), torch.float32, prior_loss_weight=0.3)
    alpha_bar = scheduler.alphas_cumprod[unet.timesteps].view(-1, 1, 1, 1)
    noise = unet.noisy_latents / (1 - alpha_bar).sqrt()
    # the prediction is zero, so each half's loss is its noise's mean square
    expected = noise[:4].pow(2).mean() + 0.3 * noise[4:].pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.fixture(scope="module")
def sampler(tiny_pipeline):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


SETTINGS = GenerationSettings(num_inference_steps=2, width=32, height=32)


def fill(sampler, folder, count, prompt="a red circle"):
    return fill_class_folder(sampler, folder, prompt, missing_indices(folder, count), SETTINGS, batch_size=2,
                             model="tiny")


def pixels(path):
    return np.asarray(Image.open(path))


def test_class_images_are_seeded_and_an_interrupted_generation_continues_the_same(sampler, tmp_path):
    whole = tmp_path / "whole"
    assert [path.name for path in fill(sampler, whole, 3)] == ["class-00000.png", "class-00001.png",
                                                              "class-00002.png"]
    # interrupted after image 1: only it was written (and a half-written file is left hidden)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    generate_class_images(sampler, resumed, "a red circle", [1], SETTINGS, batch_size=2)
    (resumed / ".class-00002.png.partial").write_bytes(b"\x89PNG half")
    assert missing_indices(resumed, 3) == [0, 2]
    fill(sampler, resumed, 3)
    for name in ("class-00000.png", "class-00001.png", "class-00002.png"):
        assert np.array_equal(pixels(whole / name), pixels(resumed / name))
    assert not np.array_equal(pixels(whole / "class-00000.png"), pixels(whole / "class-00001.png"))
    assert fill(sampler, resumed, 3) == []  # complete: nothing drawn
    assert json.loads((whole / RECORD_NAME).read_text())["prompt"] == "a red circle"


def test_images_already_in_the_class_folder_count(sampler, tmp_path):
    folder = write_images(tmp_path / "class", 2, prefix="mine")
    assert [path.name for path in fill(sampler, folder, 3)] == ["class-00000.png"]
    assert len(class_images(folder, 3)) == 3


def test_a_class_folder_drawn_with_another_prompt_is_refused(sampler, tmp_path):
    fill(sampler, tmp_path / "class", 1)
    with pytest.raises(SdtuneError, match="--class_data_dir .* another prompt .*'a red circle'"):
        fill(sampler, tmp_path / "class", 2, prompt="a blue square")


def test_dora_adapters_on_the_unet_and_text_encoder_save_in_both_formats_and_load_back(tiny_pipeline, tmp_path):
    from safetensors.torch import load_file

    from sdtune.training.lora import DIFFUSERS_WEIGHTS, add_text_encoder_adapter, add_training_adapter, save_adapter

    out = tmp_path / "dreambooth-lora"
    out.mkdir()
    args = parse_args(["--pretrained_model_name_or_path", str(tiny_pipeline), "--train_data_dir", "d", "--seed", "0",
                       "--output_dir", str(out), "--rank", "4", "--lora_alpha", "8", "--use_dora",
                       "--train_text_encoder"])
    trained = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    trained.set_progress_bar_config(disable=True)
    add_training_adapter(trained.unet, args)
    add_text_encoder_adapter(trained.text_encoder, args)
    torch.manual_seed(0)
    for model in (trained.unet, trained.text_encoder):  # as if trained: B and the magnitudes move off their start
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                parameter.data.add_(torch.randn_like(parameter) * 0.3)
    diffusers_file, kohya_file = save_adapter(args, trained.unet, trained.text_encoder)

    keys = set(load_file(diffusers_file))
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder"}
    assert any("lora_magnitude_vector" in key for key in keys)
    kohya = load_file(kohya_file)
    assert {key.split("_")[1] for key in kohya} == {"unet", "te"}  # lora_unet_..., lora_te_... (SD 1.x names)
    assert any(key.startswith("lora_te_") and key.endswith("layers_0_self_attn_q_proj.lora_down.weight")
               for key in kohya)
    scales = [key for key in kohya if key.endswith(".dora_scale")]
    assert scales and all(kohya[key].dim() == 2 and kohya[key].shape[1] == 1 for key in scales)
    assert all(kohya[key].item() == 8.0 for key in kohya if key.endswith(".alpha"))

    loaded = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    loaded.set_progress_bar_config(disable=True)
    loaded.load_lora_weights(out, weight_name=DIFFUSERS_WEIGHTS)
    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    base.set_progress_bar_config(disable=True)
    prompt_ids = trained.tokenizer("a red circle", return_tensors="pt").input_ids
    with torch.no_grad():
        trained_text, loaded_text, base_text = (p.text_encoder(prompt_ids)[0] for p in (trained, loaded, base))
        assert torch.allclose(trained_text, loaded_text, atol=1e-5)  # the text encoder's half came back
        assert not torch.allclose(trained_text, base_text, atol=1e-3)
        latents, step = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10])
        trained_out, loaded_out = (p.unet(latents, step, trained_text).sample for p in (trained, loaded))
        assert torch.allclose(trained_out, loaded_out, atol=1e-4)  # and the UNet's, DoRA magnitudes included


# DreamBooth LoRA with everything of this issue on: prior preservation with class images drawn by the run, a DoRA
# adapter on the UNet and on the text encoder, Prodigy; random flips and crops, noise offset, a warmup-cosine
# schedule. 4 instance and 4 class images, batch 4 (+4): one micro-batch an epoch.
SUBJECT_FLAGS = ("--instance_prompt", "a red circle", "--with_prior_preservation", "--class_prompt", "a circle",
                 "--num_class_images", "4", "--sample_batch_size", "2", "--train_text_encoder", "--rank", "4",
                 "--use_dora", "--optimizer", "prodigy", "--learning_rate", "1.0", "--random_flip",
                 "--noise_offset", "0.1", "--lr_scheduler", "cosine", "--lr_warmup_steps", "3",
                 "--max_train_steps", "8", "--checkpointing_steps", "4")


@pytest.mark.slow
def test_dreambooth_lora_resumes_exactly_after_sigkill_and_saves_both_adapters(tiny_pipeline, tmp_path):
    from safetensors.torch import load_file
    from test_resume import straight_and_resumed

    instance = write_images(tmp_path / "instance", 4)
    flags = ("--instance_data_dir", str(instance), "--class_data_dir", str(tmp_path / "class"), *SUBJECT_FLAGS)
    straight, interrupted = straight_and_resumed(tiny_pipeline, None, tmp_path, flags=flags)

    assert sorted(path.name for path in (tmp_path / "class").glob("*.png")) == [f"class-0000{i}.png" for i in range(4)]
    first, second = (load_file(str(folder / "pytorch_lora_weights.safetensors")) for folder in (straight, interrupted))
    assert first.keys() == second.keys()
    assert {key.split(".")[0] for key in first} == {"unet", "text_encoder"}
    for name in first:
        assert torch.equal(first[name], second[name]), name
    kohya = load_file(str(interrupted / "interrupted.safetensors"))
    assert any(key.startswith("lora_te_") for key in kohya) and any(key.startswith("lora_unet_") for key in kohya)
    assert (interrupted / "checkpoint-4" / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()
