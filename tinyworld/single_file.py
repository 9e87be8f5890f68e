"""A diffusers SD v1 pipeline folder written as one original-format checkpoint (the CompVis/LDM key layout that
A1111 and most shared SD v1 fine-tunes use: `model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`), so that the tests can serve a single file without downloading one.

diffusers reads this layout (from_single_file) but ships the reverse only as a script hard-wired to SD v1's four
blocks of two layers (scripts/convert_diffusers_to_original_stable_diffusion.py); the tiny world's models have other
block counts and depths, so the block indices here are computed from each model's config.

    python -m tinyworld.single_file PIPELINE_FOLDER OUT.safetensors
"""

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

BLOCK_PART = re.compile(r"^(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)"
                        r"\.(\d+)\.(.+)$")


def renamed_layer(rest: str, names: dict[str, str]) -> str:
    """`norm1.weight` -> `in_layers.0.weight`: the layer's name in `names`, its parameter name kept."""
    layer, parameter = rest.rsplit(".", 1)
    return f"{names.get(layer, layer)}.{parameter}"


def unet_key(key: str, config: dict) -> str:
    """A diffusers UNet2DConditionModel key in the LDM UNet's layout. Each down block is `layers` input blocks (a
    resnet, then its attention as `.1`) and a downsampler in one more; each up block is `layers + 1` output blocks,
    its upsampler beside the last one (`.1`, or `.2` after an attention)."""
    layers = config["layers_per_block"]
    top, _, parameter = key.rpartition(".")
    if top in UNET_TOP:
        return f"{UNET_TOP[top]}.{parameter}"
    match = BLOCK_PART.match(key)
    if not match:
        raise ValueError(f"no LDM name for the UNet key {key}")
    block, index, part, number, rest = match.groups()
    i, j = int(index or 0), int(number)
    if part == "resnets":
        rest = renamed_layer(rest, UNET_RESNET)
    if block == "mid_block":  # resnet, attention, resnet
        return f"middle_block.{2 * j if part == 'resnets' else 1}.{rest}"
    if block == "down_blocks":
        if part == "downsamplers":
            return f"input_blocks.{(i + 1) * (layers + 1)}.0.op.{rest.removeprefix('conv.')}"
        return f"input_blocks.{1 + i * (layers + 1) + j}.{0 if part == 'resnets' else 1}.{rest}"
    if part == "upsamplers":
        after_attention = config["up_block_types"][i].startswith("CrossAttn")
        return f"output_blocks.{i * (layers + 1) + layers}.{2 if after_attention else 1}.{rest}"
    return f"output_blocks.{i * (layers + 1) + j}.{0 if part == 'resnets' else 1}.{rest}"


def vae_key(key: str, config: dict) -> str:
    """A diffusers AutoencoderKL key in the LDM autoencoder's layout: the decoder's up blocks are numbered from the
    bottom (the reverse of diffusers'), resnets are `block`, the mid block is `block_1, attn_1, block_2`."""
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    if rest.startswith("conv_norm_out."):
        return f"{coder}.norm_out.{rest.removeprefix('conv_norm_out.')}"
    match = BLOCK_PART.match(rest)
    if not match:
        return key  # conv_in, conv_out
    block, index, part, number, inner = match.groups()
    if part == "resnets":
        inner = renamed_layer(inner, {"conv_shortcut": "nin_shortcut"})
    if block == "mid_block":
        if part == "attentions":
            return f"{coder}.mid.attn_1.{renamed_layer(inner, VAE_ATTENTION)}"
        return f"{coder}.mid.block_{int(number) + 1}.{inner}"
    i = int(index)
    if block == "up_blocks":
        i = len(config["block_out_channels"]) - 1 - i
    kind = {"resnets": f"block.{number}", "downsamplers": "downsample", "upsamplers": "upsample"}[part]
    return f"{coder}.{'down' if block == 'down_blocks' else 'up'}.{i}.{kind}.{inner}"


def vae_tensor(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The LDM VAE's mid attention uses 1x1 convolutions where diffusers has linear layers."""
    if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key):
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


def text_key(key: str) -> str:
    """SD v1's CLIP text model keeps the transformers names of CLIPTextModel as it was when SD v1 was released, under
    `text_model.`; transformers 5.6 and later save the model without that level."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


def original_state_dict(pipeline_folder) -> dict[str, torch.Tensor]:
    folder = Path(pipeline_folder)
    state = {}
    for component, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX)):
        config = json.loads((folder / component / "config.json").read_text())
        rename = unet_key if component == "unet" else vae_key
        for key, tensor in load_file(folder / component / "diffusion_pytorch_model.safetensors").items():
            ldm_key = rename(key, config)
            state[prefix + ldm_key] = vae_tensor(ldm_key, tensor) if component == "vae" else tensor
    for key, tensor in load_file(folder / "text_encoder" / "model.safetensors").items():
        state[TEXT_PREFIX + text_key(key)] = tensor
    return state


def write_single_file(pipeline_folder, path, pickle: bool = False) -> Path:
    """The pipeline as one `.safetensors` file, or with `pickle` a `.ckpt` (torch.save of {"state_dict": ...}, as
    the CompVis checkpoints are)."""
    path = Path(path)
    state = {key: tensor.contiguous() for key, tensor in original_state_dict(pipeline_folder).items()}
    if pickle:
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, str(path))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline_folder")
    parser.add_argument("output", help="a .safetensors file, or a .ckpt (a pickle)")
    args = parser.parse_args(argv)
    print(write_single_file(args.pipeline_folder, args.output, pickle=args.output.endswith(".ckpt")))


if __name__ == "__main__":
    main()
