"""Random tiny stand-ins for Stable Diffusion and its dataset: the fastest inputs for tests of code paths.

    python -m tinyworld.factories pipeline DIR   # a random SD-shaped pipeline (diffusers format, safetensors)
    python -m tinyworld.factories dataset DIR    # captioned shape images in imagefolder layout

The pipeline has Stable Diffusion's architecture at a scale that trains on a CPU in seconds: 64 px images, 16x16
latents with 4 channels, a CLIP text encoder of 2 layers. Its weights are random: it proves the code runs end to end,
not that it draws anything. For a model that draws what it is asked (the default of the offline path, make demo and
configs/tiny.yaml), use the tiny world's trained stock pipeline in tinyworld/stock (see tinyworld).
"""

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tinyworld.shapes import shape_words, write_shapes_dataset
from tinyworld.tokenizer import save_word_tokenizer

TINY_RESOLUTION = 64


def text_config(tokenizer, hidden_size: int, num_hidden_layers: int, intermediate_size: int,
                num_attention_heads: int = 4) -> CLIPTextConfig:
    """A CLIP text transformer's config sized as asked, its vocabulary, window and special tokens the tokenizer's."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def unet(block_out_channels, cross_attention: tuple[bool, ...], cross_attention_dim: int, sample_size: int,
         layers_per_block: int = 1, norm_num_groups: int = 32) -> UNet2DConditionModel:
    """A UNet of SD's design: one down block per width (with cross-attention where `cross_attention` says), mirrored
    on the way up."""
    down = tuple("CrossAttnDownBlock2D" if cross else "DownBlock2D" for cross in cross_attention)
    up = tuple("CrossAttnUpBlock2D" if cross else "UpBlock2D" for cross in reversed(cross_attention))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels), down_block_types=down, up_block_types=up,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=norm_num_groups,
    )


def vae(block_out_channels, layers_per_block: int, sample_size: int, norm_num_groups: int = 32) -> AutoencoderKL:
    """SD's VAE design with 4 latent channels; each block after the first halves the resolution."""
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, norm_num_groups=norm_num_groups, sample_size=sample_size,
    )


SD_CROSS_ATTENTION = (True, True, True, False)  # SD v1: cross-attention in all but the lowest-resolution block


def sd_layout_unet(block_out_channels, layers_per_block: int, cross_attention_dim: int, sample_size: int,
                   norm_num_groups: int = 32) -> UNet2DConditionModel:
    """SD v1's UNet layout (3 cross-attention down blocks + 1 plain, mirrored up) at the given widths."""
    return unet(block_out_channels, SD_CROSS_ATTENTION, cross_attention_dim, sample_size, layers_per_block,
                norm_num_groups)


def sd_layout_vae(block_out_channels, layers_per_block: int, sample_size: int,
                  norm_num_groups: int = 32) -> AutoencoderKL:
    """SD's VAE layout (4 blocks, 8x downsampling) at the given widths."""
    return vae(block_out_channels, layers_per_block, sample_size, norm_num_groups)


def tiny_unet(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    return unet((32, 64), (True, False), cross_attention_dim, sample_size=TINY_RESOLUTION // 4, norm_num_groups=8)


def tiny_vae() -> AutoencoderKL:
    """Three blocks: a downsampling factor of 4 (SD's has four blocks and a factor of 8)."""
    return vae((16, 32, 32), layers_per_block=1, sample_size=TINY_RESOLUTION, norm_num_groups=8)


def tiny_text_encoder(tokenizer, hidden_size: int = 32) -> CLIPTextModel:
    return CLIPTextModel(text_config(tokenizer, hidden_size, num_hidden_layers=2, intermediate_size=2 * hidden_size))


def sd_scheduler() -> PNDMScheduler:
    """The noise schedule of Stable Diffusion v1 (what its scheduler_config.json holds)."""
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    # not a PNDM setting, but SD's file has it and the DDPMScheduler that training builds from the file reads it
    scheduler.register_to_config(clip_sample=False)
    return scheduler


def write_tiny_pipeline(folder, seed: int = 0) -> Path:
    """Write a random tiny StableDiffusionPipeline whose tokenizer knows the shape captions' words."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = save_word_tokenizer(shape_words(), folder / "tokenizer")
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer, unet=tiny_unet(),
        scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["pipeline", "dataset"])
    parser.add_argument("folder")
    parser.add_argument("--count", type=int, default=64, help="dataset: number of images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what == "pipeline":
        print(write_tiny_pipeline(args.folder, args.seed))
    else:
        print(write_shapes_dataset(args.folder, args.count, args.seed, TINY_RESOLUTION))


if __name__ == "__main__":
    main()
