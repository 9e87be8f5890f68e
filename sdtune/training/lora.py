"""LoRA adapters on the UNet for training, through peft: added, saved in diffusers' and kohya's formats, described
in the model card. (Serving switches them on a shared base: sdtune/generation/adapters.py.)"""

import json
import logging
import math
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

# diffusers' LoRA example targets the attention projections (self- and cross-attention) of the UNet.
DEFAULT_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
# and, with --train_text_encoder, the CLIP text encoder's attention projections (diffusers' DreamBooth LoRA example)
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(folder) looks for


def lora_alpha(args) -> float:
    """The scaling numerator: the update is scaled by alpha / rank (--lora_alpha, by default the rank)."""
    return args.lora_alpha or args.lora_rank


def lora_config(args, target_modules=None) -> LoraConfig:
    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=lora_alpha(args),
        lora_dropout=args.lora_dropout or 0.0,
        init_lora_weights="gaussian",  # as diffusers' example: A random, B zero, so training starts at the base model
        target_modules=target_modules or args.lora_target_modules or DEFAULT_TARGET_MODULES,
        use_dora=args.use_dora,  # peft's DoRA: also a magnitude vector per adapted layer, saved with the adapter
    )


def add_training_adapter(unet, args) -> None:
    """Freeze the UNet (loaded in the mixed-precision dtype) and give it a trainable adapter.

    The adapter weights are cast to fp32: they are the optimizer's master weights, and fp16 gradient scaling refuses
    fp16 parameters.
    """
    unet.requires_grad_(False)
    config = lora_config(args)
    check_rank_fits(unet, config)
    try:
        unet.add_adapter(config)
    except ValueError as error:  # peft: none of the target modules exists in this UNet
        raise SdtuneError(f"--lora_target_modules {' '.join(sorted(config.target_modules))}: {error} "
                          f"The default is {' '.join(DEFAULT_TARGET_MODULES)}.") from error
    cast_training_params(unet, torch.float32)


def check_rank_fits(unet, config: LoraConfig) -> None:
    """Refuse, before peft allocates anything, a rank above the rank of every layer it adapts (min(in, out) of each
    targeted Linear or Conv2d): no such layer can use it, and its matrices can be huge (rank 100000 on the tiny
    world's 3.7M-parameter UNet is 896M parameters, 23 GB of RAM before the kernel kills the run)."""
    shapes = [_matrix_shape(module) for name, module in unet.named_modules()
              if check_target_module_exists(config, name)]
    shapes = [shape for shape in shapes if shape is not None]
    if not shapes:
        return  # no targeted layer: peft's own error names the modules (add_training_adapter)
    largest = max(min(shape) for shape in shapes)
    if config.r > largest:
        parameters = sum(config.r * (rows + columns) for rows, columns in shapes)
        raise SdtuneError(f"--lora_rank {config.r} is larger than any layer it adapts can use (the largest, "
                          f"min(in, out) over {len(shapes)} layers, is {largest}) and would add {parameters:,} "
                          f"parameters: choose a rank of at most {largest} (4 to 128 is usual).")


def _matrix_shape(module) -> tuple[int, int] | None:
    """(out, in) of the matrix a LoRA layer factors: a Linear's weight, or a Conv2d's flattened over its kernel."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels, module.in_channels // module.groups * math.prod(module.kernel_size)
    return None


def add_text_encoder_adapter(text_encoder, args) -> None:
    """--train_text_encoder with --lora_rank: the same rank, alpha and DoRA setting on the text encoder's attention;
    fp32 trainable weights as for the UNet."""
    text_encoder.requires_grad_(False)
    text_encoder.add_adapter(lora_config(args, TEXT_ENCODER_TARGET_MODULES))
    cast_training_params(text_encoder, torch.float32)


def kohya_path(output_dir) -> Path:
    """`<output_dir name>.safetensors` inside output_dir: the single file A1111 and ComfyUI users copy."""
    folder = Path(output_dir).resolve()
    return folder / f"{folder.name}.safetensors"


def save_adapter(args, unet, text_encoder=None) -> tuple[Path, Path]:
    """The trained adapters in diffusers' format (pytorch_lora_weights.safetensors: `unet.` keys and, with a
    `text_encoder` adapter, `text_encoder.` keys, each LoraConfig in the metadata) and in kohya's (`lora_unet_...` and
    `lora_te_...` keys, base model and settings in the metadata)."""
    unet_state = get_peft_model_state_dict(unet)
    text_state = get_peft_model_state_dict(text_encoder) if text_encoder is not None else {}
    StableDiffusionPipeline.save_lora_weights(
        args.output_dir, unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), safe_serialization=True,
        **({"text_encoder_lora_layers": text_encoder_layers(text_state),
            "text_encoder_lora_adapter_metadata": text_encoder.peft_config["default"].to_dict()} if text_state else {}))
    save_file(kohya_state(unet_state, text_state, float(lora_alpha(args))), kohya_path(args.output_dir),
              metadata=kohya_metadata(args))
    logger.info("Saved the LoRA adapter to %s (diffusers) and %s (kohya)", DIFFUSERS_WEIGHTS,
                kohya_path(args.output_dir).name)
    return Path(args.output_dir) / DIFFUSERS_WEIGHTS, kohya_path(args.output_dir)


def text_encoder_layers(text_state: dict) -> dict[str, torch.Tensor]:
    """The text encoder's adapter in diffusers' format. DoRA's magnitudes get the `.weight` suffix that transformers'
    load_adapter (which diffusers' load_lora_weights calls for the text encoder) expects; peft's state dict leaves it
    off, and without it the loaded magnitudes were silently re-initialised."""
    layers = convert_state_dict_to_diffusers(text_state)
    return {f"{key}.weight" if key.endswith(".lora_magnitude_vector") else key: value for key, value in layers.items()}


def kohya_state(unet_state: dict, text_state: dict, alpha: float) -> dict[str, torch.Tensor]:
    """peft state dicts in kohya's SD 1.x keys: `lora_unet_...`, `lora_te_...` and DoRA's `dora_scale`.

    diffusers' converter is written for SDXL and falls short here in three ways, fixed after it: it names the text
    encoder `lora_te1_` (SD 1.x's single encoder is `lora_te_` in kohya, A1111 and ComfyUI), leaves DoRA's magnitude
    as `lora_magnitude_vector` under a module prefix, and writes alpha = rank where the loaders scale by
    alpha / rank, so the trained alpha must be written instead."""
    kohya = convert_state_dict_to_kohya({**{f"unet.{key}": value for key, value in unet_state.items()},
                                         **{f"text_encoder.{key}": value for key, value in text_state.items()}})
    fixed = {}
    for key, value in kohya.items():
        key = key.replace("lora_te1_", "lora_te_", 1)
        if key.endswith(".lora_magnitude_vector"):
            # kohya/LyCORIS keep the magnitude per output channel as an [out, 1] column
            key, value = key.replace(".lora_magnitude_vector", ".dora_scale"), value.reshape(-1, 1)
        fixed[key] = torch.tensor(alpha) if key.endswith(".alpha") else value.contiguous()
    return fixed


def kohya_metadata(args) -> dict[str, str]:
    """kohya sd-scripts' `ss_` keys that A1111 and ComfyUI show, plus every sdtune setting."""
    settings = {k: v for k, v in vars(args).items() if k not in ("config", "hub_token")}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(args.lora_rank),
        "ss_network_alpha": str(lora_alpha(args)),
        "ss_sd_model_name": args.pretrained_model_name_or_path,
        "ss_resolution": f"({args.resolution}, {args.resolution})",
        "ss_learning_rate": str(args.learning_rate),
        "ss_max_train_steps": str(args.max_train_steps),
        "ss_seed": str(args.seed),
        "ss_training_comment": f"LoRA of {args.pretrained_model_name_or_path}'s UNet trained with sdtune",
        "sdtune_training_config": json.dumps(settings, sort_keys=True, default=str),
    }


def card_sections(args, trainable_parameters: int, dataset: str) -> tuple[str, str, str]:
    """Title, summary and usage of a LoRA run's model card."""
    base = args.pretrained_model_name_or_path
    kohya_file = kohya_path(args.output_dir).name
    title = f"LoRA for {base}"
    modules = " ".join(args.lora_target_modules or DEFAULT_TARGET_MODULES)
    summary = (f"A rank-{args.lora_rank} LoRA adapter ({trainable_parameters:,} parameters, alpha {lora_alpha(args)}, "
               f"modules {modules}) on the UNet of `{base}`, trained on `{dataset}` with sdtune. It needs that base "
               f"model: `{DIFFUSERS_WEIGHTS}` is the diffusers format, `{kohya_file}` the same adapter in kohya's "
               "format.")
    usage = f"""diffusers:
```python
import torch
from diffusers import StableDiffusionPipeline

pipeline = StableDiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16)
pipeline.load_lora_weights("{args.hub_model_id or args.output_dir}")
image = pipeline("yoda", generator=torch.Generator().manual_seed(0)).images[0]
```

AUTOMATIC1111: copy `{kohya_file}` into `models/Lora/`, select `{base}` as the checkpoint and add
`<lora:{Path(kohya_file).stem}:1>` to the prompt.

ComfyUI: copy `{kohya_file}` into `models/loras/` and put a "Load LoRA" node between "Load Checkpoint" (`{base}`)
and the sampler.

sdtune (gradio_app.py, metrics.py, the batch CLI): a model entry
`{{name: my-lora, path: {base}, lora: {args.output_dir}, lora_scale: 1.0}}`.
"""
    return title, summary, usage
