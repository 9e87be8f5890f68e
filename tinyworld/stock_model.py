"""The tiny stock model: a StableDiffusionPipeline around the tiny VAE and CLIP text tower, whose fresh UNet is trained
on the base world with the project's own trainer (train_text_to_image.py's main), as Stable Diffusion was trained
on LAION before anyone fine-tuned it on pokemon."""

import json
import shutil
from pathlib import Path

from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPTokenizer

from tinyworld.clip_model import text_encoder_of
from tinyworld.factories import sd_scheduler, unet
from tinyworld.training import seeded

PIPELINE_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae")


def build_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    """Cross-attention at every resolution, the latent's full 16x16 included: colour words must reach every pixel."""
    return unet((64, 96, 96), (True, True, False), cross_attention_dim, sample_size=16, norm_num_groups=16)


def assemble_pipeline(folder, vae_folder, clip_folder, seed: int = 0) -> Path:
    """A pipeline folder with the trained VAE, CLIP's text tower and tokenizer, a random UNet and SD's scheduler."""
    clip = CLIPModel.from_pretrained(clip_folder)
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_folder), text_encoder=text_encoder_of(clip),
        tokenizer=CLIPTokenizer.from_pretrained(clip_folder),
        unet=seeded(lambda: build_unet(clip.config.text_config.hidden_size), seed),
        scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def ship(run_folder, folder) -> Path:
    """Copy the trained pipeline's parts (no checkpoints, logs or model card) to the shipped folder, without the
    build machine's paths that diffusers records as `_name_or_path`."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for part in PIPELINE_PARTS:
        source = Path(run_folder) / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / part)
    for config in [folder / "model_index.json", *folder.glob("*/config.json")]:
        values = json.loads(config.read_text())
        values.pop("_name_or_path", None)
        config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    return folder
