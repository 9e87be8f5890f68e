"""Loading the parts of a Stable Diffusion pipeline that training needs, and choosing their attention kernels."""

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sdtune.errors import SdtuneError


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def load_components(args, frozen_dtype) -> Components:
    """Load from a hub id or folder; the VAE and text encoder are frozen (in `frozen_dtype`), the UNet is trained
    (in fp32: the optimizer's master weights), or with --lora_rank frozen too and only its adapter trained."""
    common = {"revision": args.revision, "cache_dir": args.cache_dir}
    source = args.pretrained_model_name_or_path
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=args.variant,
                                                     dtype=frozen_dtype, **common)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=args.variant, torch_dtype=frozen_dtype,
                                            **common)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=args.variant,
                                                    torch_dtype=frozen_dtype if args.lora_rank else None, **common)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
    except (OSError, ValueError) as error:
        raise SdtuneError(f"Cannot load the pipeline '{source}': {error}\n"
                          "Give a local folder in diffusers layout or a hub id you can reach "
                          "(offline: the tiny world's tinyworld/stock).") from error
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler)


def use_xformers(unet) -> None:
    """Switch the UNet to xformers attention, or explain why it cannot be."""
    from diffusers.utils.import_utils import is_xformers_available

    if not is_xformers_available():
        raise SdtuneError("--enable_xformers_memory_efficient_attention: xformers is not installed. "
                          "Install it for your CUDA build (pip install xformers), or drop the flag: "
                          "PyTorch's scaled-dot-product attention is used by default and is as memory-efficient "
                          "on recent GPUs.")
    unet.enable_xformers_memory_efficient_attention()


def compile_unet_for_training(unet) -> None:
    """Compile in place, before accelerator.prepare: no `_orig_mod` wrapper, so unwrapping, checkpoints and the saved
    pipeline see the plain module. Validation runs without gradients, which compiles a second graph once."""
    unet.compile()
