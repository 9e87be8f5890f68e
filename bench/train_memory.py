"""Benchmark: peak tensor memory of one training step of the full-size SD v1-4 UNet (512 px, batch 1), by category.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/train_memory.py [--autocast_policy cpu] [--recipes ...]

Five recipes, read from their YAML files through sdtune.training.config:
  configs/pokemon.yaml         fp16 autocast with fp32 master weights, AdamW, EMA on the device, gradient
                               checkpointing, VAE + text encoder in fp16 on the device; target <= 20 GiB
  configs/pokemon-lowmem.yaml  the same with bitsandbytes' AdamW8bit, the EMA in CPU memory and cached latents
                               (VAE + text encoder off the device); target <= 12 GiB
  configs/pokemon-lora.yaml    a rank-4 LoRA: the UNet frozen in fp16, the adapter's fp32 weights trained with
                               AdamW, gradient checkpointing, VAE + text encoder in fp16 on the device; target <= 6 GiB
  configs/dreambooth-lora.yaml DreamBooth: a rank-4 LoRA of the UNet and of the text encoder (its adapter in fp32 on
                               the fp16 encoder), prior preservation (each step's batch is an instance image and a
                               class image: twice the activations), AdamW, gradient checkpointing; target <= 4 GiB
  configs/dreambooth.yaml      DreamBooth: the whole UNet and text encoder trained (fp32 master weights), prior
                               preservation, 8-bit AdamW, gradient checkpointing; target <= 22 GiB (a 24 GB GPU)

The subject recipes' folders are replaced by a one-image placeholder, so that their flags pass the data check: the
step's memory depends on the resolution and the batch, not on the pictures. A trained text encoder is set up by
sdtune.training.subject.make_text_encoder_trainable (all of it in fp32, or its LoRA adapter), on the meta device as
the LoRA UNet is (below), and its forward runs under autocast, as accelerate.prepare leaves it.

How it measures: the models are built from SD v1-4's published configs (below; no download) with random weights
under FakeTensorMode, so every tensor has its real shape and dtype but no storage: a step of the 860M-parameter UNet
costs seconds and no RAM. torch's MemTracker counts every tensor the step allocates, by category, and keeps the
snapshot at the peak. The step is sdtune's: sdtune.training.objective.diffusion_loss,
sdtune.training.optim.make_optimizer, diffusers' EMAModel through sdtune.training.loop.make_ema,
sdtune.training.optim.update_offloaded_ema; around them, what accelerate does on a GPU under fp16 (autocast around the
UNet's forward, loss scaling, unscaling before clipping). One step is run first so that the optimizer state exists, as
it does at every later step; the second step is measured. bitsandbytes' AdamW8bit runs under FakeTensorMode too: its own
init_state makes its state tensors and its update op has a fake kernel; only its constructor runs outside (it builds its
quantisation map from real numbers). The LoRA recipe's UNet is built in fp16, as
sdtune.training.components.load_components loads it for --lora_rank, and gets its adapter from
sdtune.training.lora.add_training_adapter itself (peft's layers through diffusers' add_adapter, then
cast_training_params to fp32). peft moves each new layer to its base layer's device and dtype with Module.to, which
cannot swap a parameter under FakeTensorMode (the fake mode holds weak references to its tensors); so the UNet is built
on the meta device (shapes and dtypes, no storage), sdtune.training.loop.configure_unet and add_training_adapter run on
it unchanged, and then Module.to_empty gives every tensor fake CPU storage of the same shape and dtype. The output
states the dtypes of the trained and frozen UNet weights. MemTracker hooks the gradient of every parameter of a module
it sees run and torch refuses a hook on a frozen one, so frozen parameters are registered as already hooked
(FrozenAwareMemTracker): they are still counted, and they never get a gradient to count.

The GPU is emulated where the CPU differs: AdamW runs its foreach implementation (torch's default for CUDA tensors;
the CPU default is a per-tensor loop with smaller temporaries), and fp16 autocast follows CUDA's casting rules (CPU
autocast runs group_norm, layer_norm, softmax and other CUDA-fp32 ops in fp16; --autocast_policy cpu measures that).
"""

import argparse
import os
import platform
import shlex
import tempfile
import time
from collections import OrderedDict
from datetime import date

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing may be downloaded

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402
from torch.utils._pytree import tree_map_only  # noqa: E402
from torch.utils.hooks import RemovableHandle  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from sdtune.seeds import step_generator  # noqa: E402
from sdtune.training.components import Components  # noqa: E402
from sdtune.training.config import parse_args, settings_from  # noqa: E402
from sdtune.training.loop import configure_unet, make_ema  # noqa: E402
from sdtune.training.lora import add_training_adapter  # noqa: E402
from sdtune.training.objective import diffusion_loss  # noqa: E402
from sdtune.training.optim import OptimizerSettings, make_optimizer, update_offloaded_ema  # noqa: E402
from sdtune.training.subject import make_text_encoder_trainable  # noqa: E402

GIB = 2**30
TARGETS_GIB = {"configs/pokemon.yaml": 20, "configs/pokemon-lowmem.yaml": 12, "configs/pokemon-lora.yaml": 6,
               "configs/dreambooth-lora.yaml": 4, "configs/dreambooth.yaml": 22}

# CompVis/stable-diffusion-v1-4: unet/config.json, vae/config.json, text_encoder/config.json (as published)
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD14_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=512,
)
SD14_TEXT_ENCODER = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SD14_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

# CUDA autocast's float32 list (torch.amp docs, "CUDA Ops that can autocast to float32"), by function name
CUDA_FP32_OPS = {
    "acos", "asin", "binary_cross_entropy_with_logits", "cosh", "cosine_embedding_loss", "cdist",
    "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist", "erfinv", "exp", "expm1", "group_norm",
    "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm", "log", "log_softmax", "log10", "log1p", "log2",
    "margin_ranking_loss", "mse_loss", "multilabel_margin_loss", "multi_margin_loss", "nll_loss", "norm",
    "normalize", "pdist", "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh", "smooth_l1_loss",
    "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan", "triplet_margin_loss",
}
CUDA_POLICY = torch.library.Library("aten", "IMPL")  # holds the emulation's kernels for the process's lifetime
LOSS_SCALE = 65536.0  # GradScaler's initial scale; any value gives the same memory


def parse_bench_args(argv=None) -> argparse.Namespace:
    """The benchmark's flags; the training settings come from the recipes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(TARGETS_GIB), help="YAML recipes to measure.")
    parser.add_argument("--training_flags", default="",
                        help="Training flags added to every recipe's, in one string: --training_flags=--use_dora")
    parser.add_argument("--autocast_policy", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: CUDA's fp32 op list emulated on top of CPU autocast; cpu: CPU autocast as is.")
    return parser.parse_args(argv)


def emulate_cuda_fp32_ops(library: torch.library.Library) -> list[str]:
    """Make CPU fp16 autocast compute CUDA autocast's float32 ops in float32, as a GPU would; returns their names.

    CPU autocast lowers the precision of matmuls and convolutions only and runs every other op in the dtype that
    comes in, so after a convolution it runs group_norm in fp16; CUDA casts such ops' inputs to fp32, which makes
    bigger activations. The kernels go in at the AutocastCPU dispatch key, so they also hold when gradient
    checkpointing recomputes a block in the backward pass (it restores the autocast state, not Python context).
    """
    registered = []
    for name in sorted(CUDA_FP32_OPS):
        packet = getattr(torch.ops.aten, name, None)  # some names are Python-level only (normalize, ...)
        for overload in packet.overloads() if packet is not None else []:
            op = getattr(packet, overload)
            if takes_and_returns_tensors(op) and not torch._C._dispatch_has_kernel_for_dispatch_key(
                    op.name(), "AutocastCPU"):  # CPU's own float32 list (mse_loss, ...) already does this
                library.impl(op.name().removeprefix("aten::"), fp32_kernel(op), "AutocastCPU")
                registered.append(name)
    return sorted(set(registered))


def takes_and_returns_tensors(op) -> bool:
    """A functional overload on tensors: no out= or in-place variants, no scalar-only ones."""
    schema = op._schema
    mutates = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    takes_tensor = any(isinstance(a.type, torch.TensorType) for a in schema.arguments)
    return takes_tensor and not mutates and all(isinstance(r.type, torch.TensorType) for r in schema.returns)


def fp32_kernel(op):
    """An autocast kernel: cast floating inputs to fp32, then run the op below the autocast layer."""
    below_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(below_autocast):
            args, kwargs = tree_map_only(torch.Tensor, to_fp32, (args, kwargs))
            return op(*args, **kwargs)

    return kernel


def to_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def autocast_check() -> list[str]:
    """The ops the SD UNet uses that CPU fp16 autocast leaves in fp16 where CUDA autocast computes in fp32."""
    x = torch.randn(1, 32, 4, 4, dtype=torch.float16)
    probes = {"group_norm": lambda: F.group_norm(x, 8), "layer_norm": lambda: F.layer_norm(x, (4,)),
              "softmax": lambda: x.softmax(-1), "pow": lambda: x.pow(2), "sum": lambda: x.sum()}
    with torch.autocast("cpu", dtype=torch.float16):
        return [name for name, probe in probes.items() if probe().dtype == torch.float16]


class AutocastForward:
    """The UNet as accelerate.prepare leaves it under fp16: forward in autocast, floating outputs back in fp32."""

    def __init__(self, unet, dtype):
        self.unet, self.dtype = unet, dtype

    def __call__(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=self.dtype):
            outputs = self.unet(*args, **kwargs)
        return tree_map_only(torch.Tensor, to_fp32, outputs)


def build_parts(args, weight_dtype, fake: FakeTensorMode) -> Components:
    """SD v1-4's UNet and, with --train_text_encoder, its text encoder, set up as sdtune.training.loop.set_up sets
    them up, and the frozen rest (in the recipe's dtype), all with fake storage."""
    torch.manual_seed(0)
    unet = build_unet(args, weight_dtype, fake)
    text_encoder = build_trained_text_encoder(args, weight_dtype, fake) if args.train_text_encoder else None
    with fake:
        return build_frozen_parts(unet, text_encoder, weight_dtype)


def build_unet(args, weight_dtype, fake: FakeTensorMode) -> UNet2DConditionModel:
    """The UNet as load_components loads it (fp32: the master weights; with --lora_rank frozen in the recipe's
    dtype), configured and given its adapter by sdtune on the meta device, then given fake CPU storage."""
    with torch.device("meta"):
        unet = build_in_dtype(lambda: UNet2DConditionModel(**SD14_UNET),
                              weight_dtype if args.lora_rank else torch.float32)
    unet.train()
    configure_unet(unet, gradient_checkpointing=args.gradient_checkpointing, allow_tf32=args.allow_tf32,
                   xformers=args.enable_xformers_memory_efficient_attention, compile=args.compile)
    if args.lora_rank:
        add_training_adapter(unet, args)
    with fake:
        return unet.to_empty(device="cpu")


def build_trained_text_encoder(args, weight_dtype, fake: FakeTensorMode) -> CLIPTextModel:
    """--train_text_encoder: the text encoder loaded in the recipe's dtype and made trainable by sdtune (all of it in
    fp32, or a LoRA adapter), on the meta device, then given fake CPU storage (as build_unet)."""
    with torch.device("meta"):
        text_encoder = build_in_dtype(lambda: CLIPTextModel(CLIPTextConfig(**SD14_TEXT_ENCODER)), weight_dtype)
    make_text_encoder_trainable(text_encoder, args)
    with fake:
        return text_encoder.to_empty(device="cpu")


def build_frozen_parts(unet, text_encoder, weight_dtype) -> Components:
    """The frozen VAE and, unless it is trained (`text_encoder` given), the frozen text encoder."""
    vae = build_in_dtype(lambda: AutoencoderKL(**SD14_VAE), weight_dtype)
    vae.requires_grad_(False)
    if text_encoder is None:
        text_encoder = build_in_dtype(lambda: CLIPTextModel(CLIPTextConfig(**SD14_TEXT_ENCODER)), weight_dtype)
        text_encoder.requires_grad_(False)
    return Components(None, text_encoder, vae, unet, DDPMScheduler(**SD14_SCHEDULER))


def build_in_dtype(build, dtype):
    """A model built with `dtype` as the default: under FakeTensorMode, Module.to(dtype) cannot swap the parameters
    it converts (see the module's docstring)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build()
    finally:
        torch.set_default_dtype(default_dtype)


def make_batch(args, weight_dtype) -> dict:
    """One micro-batch as the data loader delivers it: pixels and token ids, or cached latents and embeddings; with
    prior preservation, the instance examples and as many class examples (sdtune.data.subject_dataset)."""
    latent = args.resolution // 8
    size = args.train_batch_size * (2 if args.with_prior_preservation else 1)
    if args.cache_latents:
        # build_latent_cache stores the frozen models' outputs in their dtype
        return {"latent_mean": torch.randn(size, 4, latent, latent, dtype=weight_dtype),
                "latent_std": torch.rand(size, 4, latent, latent, dtype=weight_dtype),
                "encoder_hidden_states": torch.randn(size, 77, SD14_TEXT_ENCODER["hidden_size"], dtype=weight_dtype)}
    return {"pixel_values": torch.rand(size, 3, args.resolution, args.resolution) * 2 - 1,
            "input_ids": torch.randint(0, SD14_TEXT_ENCODER["vocab_size"], (size, 77))}


def make_step_optimizer(args, trained) -> torch.optim.Optimizer:
    """sdtune's optimizer, made outside FakeTensorMode (AdamW8bit computes its quantisation map with .tolist()).

    torch's AdamW picks its foreach implementation for CUDA tensors and a per-tensor loop for CPU ones; foreach is
    set here so that its temporaries (a full fp32 copy of the second moments) are those of a GPU run.
    """
    optimizer = make_optimizer(trained, settings_from(OptimizerSettings, args), num_processes=1)
    if isinstance(optimizer, torch.optim.AdamW):
        for group in optimizer.param_groups:
            group["foreach"] = True
    return optimizer


def training_step(args, parts, trained, calls, optimizer, ema, peaks, tracker=None) -> None:
    """One step in sdtune.training.loop.train_step's order; `calls`: the UNet's and the trained text encoder's (or
    None) forward as accelerate.prepare leaves them. Appends (phase, the peak so far by category) after each phase if
    tracked."""
    weight_dtype = torch.float16 if args.mixed_precision == "fp16" else torch.float32

    def record(phase):
        if tracker is not None:
            peaks.append((phase, by_category(tracker.get_tracker_snapshot("peak"))))

    batch = make_batch(args, weight_dtype)  # made here, so that the tracked step counts it as it lands
    unet_call, text_encoder_call = calls
    loss = diffusion_loss(batch, unet_call, parts, step_generator(args.seed, 0, 0, 0), weight_dtype,
                          noise_offset=args.noise_offset, snr_gamma=args.snr_gamma,
                          prior_loss_weight=args.prior_loss_weight if args.with_prior_preservation else None,
                          text_encoder=text_encoder_call)
    record("forward")
    (loss * LOSS_SCALE).backward()  # accelerator.backward: GradScaler.scale(loss).backward()
    record("backward")
    grads = [p.grad for p in trained if p.grad is not None]
    torch._foreach_mul_(grads, 1 / LOSS_SCALE)  # GradScaler.unscale_ in accelerator.clip_grad_norm_: in place
    torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    record("optimizer step")
    if ema is not None and not args.offload_ema:
        ema.step(trained)
        record("EMA update")


def by_category(snapshot: dict) -> dict[str, int]:
    """A MemTracker snapshot summed over devices, keyed by category name ('Parameter', ..., 'Total')."""
    totals = {}
    for device in snapshot.values():
        for key, value in device.items():
            name = getattr(key, "value", key)
            totals[name] = totals.get(name, 0) + value
    return totals


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors' storages, each tensor once (AdamW8bit's quantisation maps are shared by all states)."""
    distinct = {id(tensor): tensor for tensor in tensors}
    return sum(tensor.untyped_storage().nbytes() for tensor in distinct.values())


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]


class FrozenAwareMemTracker(MemTracker):
    """MemTracker for a model with frozen parameters: it hooks the gradient of every parameter of a module it sees
    run, and torch refuses a hook on a tensor that needs no gradient. A frozen parameter is registered as hooked
    already (with handles that remove nothing), so it is counted as a parameter and has no gradient to count."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        for param in module.parameters():
            if not param.requires_grad and param not in self._param_to_grad_hook_handles:
                no_hook = RemovableHandle(OrderedDict())  # removes nothing (it needs a weak-referenceable dict)
                self._param_to_grad_hook_handles[param] = (no_hook, no_hook)
        return super()._track_module_params_and_buffers(module, install_grad_hooks)


def recipe_args(recipe: str, placeholder: str, training_flags: list[str]):
    """The recipe's settings (and `training_flags`) as sdtune parses them; a subject recipe's folders replaced by
    `placeholder` (one image), since the data check reads them and the memory of a step does not depend on them."""
    with open(recipe) as f:
        subject = "instance_data_dir" in (yaml.safe_load(f) or {})
    folders = ["--instance_data_dir", placeholder, "--class_data_dir", placeholder] if subject else []
    return parse_args(["--config", recipe, *folders, *training_flags])


def placeholder_folder(folder: str) -> str:
    Image.new("RGB", (64, 64)).save(os.path.join(folder, "subject.png"))
    return folder


def measure_recipe(recipe: str, training_flags: list[str]) -> dict:
    """Build the recipe's parts under FakeTensorMode, run a warm-up step, then track the second step's memory."""
    with tempfile.TemporaryDirectory() as folder:
        args = recipe_args(recipe, placeholder_folder(folder), training_flags)
    weight_dtype = torch.float16 if args.mixed_precision == "fp16" else torch.float32
    fake = FakeTensorMode(allow_non_fake_inputs=True)  # the scheduler's tables and AdamW8bit's map stay real
    parts = build_parts(args, weight_dtype, fake)
    unet_trained = [p for p in parts.unet.parameters() if p.requires_grad]
    trained = unet_trained + [p for p in parts.text_encoder.parameters() if p.requires_grad]
    with fake:
        ema = make_ema(parts.unet, unet_trained, "cpu", use_ema=args.use_ema, decay=args.ema_decay,
                       adapter=bool(args.lora_rank), offload=args.offload_ema)
    optimizer = make_step_optimizer(args, trained)
    calls = (autocast_call(parts.unet, weight_dtype, args),
             autocast_call(parts.text_encoder, weight_dtype, args) if args.train_text_encoder else None)

    peaks = []
    with fake:
        warm_up(args, parts, trained, calls, optimizer, ema)
        tracker = FrozenAwareMemTracker()
        tracker.track_external(parts.unet, optimizer)
        if ema is not None and not args.offload_ema:
            tracker.track_external(*ema.shadow_params)  # counted as "Other": nothing else is
        if not args.cache_latents:
            tracker.track_external(parts.vae, parts.text_encoder)
        with tracker:
            training_step(args, parts, trained, calls, optimizer, ema, peaks, tracker)
        if ema is not None and args.offload_ema:
            update_offloaded_ema(ema, trained)  # in CPU memory: outside the tracked device
    return summarise(args, parts, unet_trained, trained, optimizer, ema, tracker, peaks)


def autocast_call(model, weight_dtype, args):
    return AutocastForward(model, weight_dtype) if args.mixed_precision == "fp16" else model


def warm_up(args, parts, trained, calls, optimizer, ema) -> None:
    """A first, untracked step: creates the optimizer state that every later step carries."""
    training_step(args, parts, trained, calls, optimizer, ema, [])
    if ema is not None and args.offload_ema:
        update_offloaded_ema(ema, trained)


def weight_dtypes(parts, trained) -> str:
    """The dtypes the UNet's trained and frozen parameters are held in, e.g. 'trained fp32, frozen fp16'."""
    trained_ids = {id(p) for p in trained}
    frozen = [p for p in parts.unet.parameters() if id(p) not in trained_ids]
    names = {name: sorted({str(p.dtype).removeprefix("torch.") for p in group})
             for name, group in (("trained", trained), ("frozen", frozen)) if group}
    return ", ".join(f"{name} {'/'.join(dtypes)}" for name, dtypes in names.items())


def summarise(args, parts, unet_trained, trained, optimizer, ema, tracker, peaks) -> dict:
    """The peak snapshot split into the benchmark's categories, with the analytic size of each where there is one.
    `unet_trained`: the UNet's trained parameters; `trained`: those and the text encoder's (--train_text_encoder)."""
    by_type = by_category(tracker.get_tracker_snapshot("peak"))
    frozen = tensor_bytes([t for model in frozen_models(args, parts) for t in (*model.parameters(), *model.buffers())])
    text_encoder = (tensor_bytes([*parts.text_encoder.parameters(), *parts.text_encoder.buffers()])
                    if args.train_text_encoder else 0)
    state = tensor_bytes(optimizer_state_tensors(optimizer))
    ema_on_device = ema is not None and not args.offload_ema
    unet = by_type["Parameter"] + by_type["Buffer"] - frozen - text_encoder
    adapter = tensor_bytes(unet_trained)
    rows = {
        **({"frozen UNet (fp16)": unet - adapter, "adapter (fp32)": adapter} if args.lora_rank
           else {"parameters (UNet, fp32)": unet}),
        **({text_encoder_row(args): text_encoder} if args.train_text_encoder else {}),
        "gradients (fp32)": by_type["Gradient"],
        "optimizer state": min(state, by_type["Optstate"]),
        "optimizer-step temporaries": max(by_type["Optstate"] - state, 0),
        **({"EMA weights": by_type["Other"] if ema_on_device else None} if args.use_ema else {}),
        "activations (forward)": by_type["Activation"],
        "backward temporaries": by_type["Temp"],
        frozen_row(args): frozen if not args.cache_latents else None,
    }
    peak_phase = next(phase for phase, peak in peaks if peak["Total"] == by_type["Total"])
    return {"args": args, "rows": rows, "total": by_type["Total"], "peak_phase": peak_phase, "phases": peaks,
            "expected": expected_bytes(args, parts, unet_trained, trained, ema_on_device),
            "dtypes": weight_dtypes(parts, unet_trained), "trained": sum(p.numel() for p in trained)}


def frozen_models(args, parts) -> list[torch.nn.Module]:
    """The frozen models on the device beside the UNet: none with cached latents, else the VAE and the text encoder
    unless it is trained."""
    if args.cache_latents:
        return []
    return [parts.vae] + ([] if args.train_text_encoder else [parts.text_encoder])


def text_encoder_row(args) -> str:
    return "text encoder (fp16 + fp32 adapter)" if args.lora_rank else "text encoder (fp32, trained)"


def frozen_row(args) -> str:
    return "frozen VAE" if args.train_text_encoder else "frozen VAE + text encoder"


def expected_bytes(args, parts, unet_trained, trained, ema_on_device) -> dict:
    """Sizes that follow from the parameter counts alone, to check the tracked ones against."""
    count, unet_count = sum(p.numel() for p in trained), sum(p.numel() for p in unet_trained)
    frozen_unet = sum(p.numel() for p in parts.unet.parameters()) - unet_count
    expected = {"parameters (UNet, fp32)": 4 * unet_count, "adapter (fp32)": 4 * unet_count,
                "frozen UNet (fp16)": 2 * frozen_unet, "gradients (fp32)": 4 * count,
                "EMA weights": 4 * unet_count if ema_on_device else None}
    if args.train_text_encoder:
        text_trained = count - unet_count
        text_frozen = sum(p.numel() for p in parts.text_encoder.parameters()) - text_trained
        expected[text_encoder_row(args)] = 4 * text_trained + 2 * text_frozen
    if args.use_8bit_adam:
        # AdamW8bit: two uint8 moments plus an fp32 absmax per 256-value block; tensors under 4096 values stay fp32
        expected["optimizer state"] = sum(8 * p.numel() if p.numel() < 4096 else
                                          2 * p.numel() + 8 * -(-p.numel() // 256) for p in trained)
    else:
        expected["optimizer state"] = 8 * count  # two fp32 moments (+ a CPU-side step count per tensor)
        expected["optimizer-step temporaries"] = 4 * count  # foreach AdamW's sqrt(v) for every tensor at once
    if not args.cache_latents:
        frozen = sum(p.numel() for m in frozen_models(args, parts) for p in m.parameters())
        expected[frozen_row(args)] = frozen * torch.finfo(parts.vae.dtype).bits // 8
    return expected


def print_recipe(recipe: str, result: dict) -> None:
    """One table: category, GiB at the peak, the analytic size where there is one, and how it was obtained."""
    args = result["args"]
    ema = "none" if not args.use_ema else "CPU" if args.offload_ema else "device"
    print(f"{recipe}: fp16 autocast={args.mixed_precision == 'fp16'}, 8-bit AdamW={args.use_8bit_adam}, "
          f"EMA={ema}, cached latents={args.cache_latents}, gradient "
          f"checkpointing={args.gradient_checkpointing}, {args.resolution} px, batch {args.train_batch_size}"
          f"{' + as many class images (prior preservation)' if args.with_prior_preservation else ''}, "
          f"LoRA rank={args.lora_rank or 'none'}{' (DoRA)' if args.use_dora else ''}, "
          f"text encoder trained={args.train_text_encoder}; "
          f"UNet weights: {result['dtypes']}, {result['trained']:,} parameters trained")
    print(f"  {'GiB at the peak':<36}{'measured':>10}{'computed':>10}")
    for name, value in result["rows"].items():
        expected = result["expected"].get(name)
        measured = f"{value / GIB:>10.2f}" if value is not None else f"{'off device':>10}"
        computed = f"{expected / GIB:>10.2f}" if expected is not None else ""
        print(f"  {name:<36}{measured}{computed}")
    target = TARGETS_GIB.get(recipe.split()[0])
    total = result["total"] / GIB
    verdict = "" if target is None else f"; target <= {target} GiB: {'met' if total <= target else 'MISSED'}"
    print(f"  {'total':<36}{total:>10.2f}{'':>10}  reached in the {result['peak_phase']}{verdict}")
    so_far = ", ".join(f"{phase} {peak['Total'] / GIB:.2f} (activations {peak['Activation'] / GIB:.2f})"
                       for phase, peak in result["phases"])
    print(f"  peak so far after each phase, GiB: {so_far}")


def main(argv=None) -> None:
    bench = parse_bench_args(argv)
    print(f"train_memory, {date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"autocast policy: {bench.autocast_policy}")
    print(f"CPU fp16 autocast keeps in fp16 what CUDA autocast computes in fp32: {', '.join(autocast_check())}")
    if bench.autocast_policy == "cuda":
        ops = emulate_cuda_fp32_ops(CUDA_POLICY)
        print(f"emulating CUDA's policy: fp16 inputs cast to fp32 for {len(ops)} aten ops ({', '.join(ops)})")
        if autocast_check():
            raise SystemExit(f"the CUDA autocast emulation did not take: {autocast_check()} still run in fp16")
    for recipe in bench.recipes:
        start = time.perf_counter()
        result = measure_recipe(recipe, shlex.split(bench.training_flags))
        print()
        print_recipe(f"{recipe} {bench.training_flags}".strip(), result)
        print(f"  ({time.perf_counter() - start:.0f} s)")
    print()
    print("measured: MemTracker's count of the step's tensors under FakeTensorMode (real shapes and dtypes, no data), "
          "by category at the moment of the peak; the optimizer's MemTracker category is split into its state "
          "(the size of the state tensors) and the step's temporaries (the rest). computed: from the parameter "
          "counts alone. Activations include autocast's cached fp16 copies of the weights. CUDA context and "
          "allocator fragmentation are not tensor memory and are not counted.")


if __name__ == "__main__":
    main()
