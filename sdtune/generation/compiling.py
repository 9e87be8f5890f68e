"""--compile for serving: torch.compile of the UNet (the app, the batch CLI, metrics.py; training compiles in
sdtune/training/components.py).

Serving compiles the UNet once, at load, and keeps every later request on that graph:
- schedulers hand the UNet its timestep as an int64 tensor (DPM-Solver++, DDIM, PLMS) or a float32 one (Euler a);
  a dtype the graph has not seen fails its guards and recompiles, so the timestep always arrives as float32 (the
  UNet's time embedding casts it to float anyway: the same image);
- a base pipeline with LoRA models gets one adapter slot before it is compiled (`AdapterSlot`); the models take
  turns in it through diffusers' hotswap, which copies weights into the slot's tensors instead of adding modules,
  and the scale is a tensor filled in place instead of peft's Python float, which the graph would guard on.
The VAE is not compiled: its decode is about 1% of an image's time at the tiny world's 64 px (bench/README.md).

What still compiles again (each about as long as the first compile: 73 s for the tiny world's UNet on 2 CPU cores):
a new image size or batch size (more images a request, guidance 1): the first change of each makes that dimension
dynamic, and later values reuse the graph;
training's first validation (no gradients: a graph of its own). An adapter that targets other layers than the slot's
first one cannot be swapped in: its model is unavailable, with diffusers' reason.
"""

import functools
import weakref

import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer

SLOT = "compiled-slot"  # the adapter name every LoRA model on a compiled base is loaded under
DOWN_PROJECTIONS = ("lora_A", "lora.down", "lora_down")  # peft's, diffusers' and kohya's names for the A matrix
_compiled_unets = weakref.WeakSet()  # a UNet shared by two base pipelines is compiled once


def compile_unet_for_serving(unet) -> None:
    """Compile the UNet's forward in place (its module and state-dict keys stay as they are); the first call
    compiles, on this machine's CPU about a minute for the tiny world's UNet."""
    if unet in _compiled_unets:
        return
    _compiled_unets.add(unet)
    compiled = torch.compile(unet.forward)

    @functools.wraps(unet.forward)
    def forward(sample, timestep, *args, **kwargs):
        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float32)  # one dtype: no recompile
        return compiled(sample, timestep, *args, **kwargs)

    unet.forward = forward


def adapter_rank(adapter: str) -> int:
    """The rank of a LoRA adapter (a folder, a diffusers or kohya file): the largest of its down-projections."""
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(adapter)
    downs = [value.shape[0] for key, value in state_dict.items() if any(n in key for n in DOWN_PROJECTIONS)]
    return max(downs)


class AdapterSlot:
    """The one LoRA adapter of a compiled base pipeline, which its LoRA models take turns in."""

    def __init__(self, pipeline, adapters: list[str]):
        """Load the first adapter that loads, padded to the largest rank of `adapters`; call before compiling."""
        self.pipeline = pipeline
        self.created = False  # the slot's layers exist: later adapters are swapped into them
        self.loaded: str | None = None
        self._unit: dict[str, torch.Tensor] = {}  # each layer's scaling at scale 1 for the adapter in the slot
        ranks = [rank for rank in map(_readable_rank, adapters) if rank]
        if ranks:
            pipeline.enable_lora_hotswap(target_rank=max(ranks))
        for adapter in adapters:
            try:
                self._load(adapter)
                return
            except Exception:  # a broken adapter: its own model reports why when the registry loads it
                continue

    def activate(self, adapter: str | None, scale: float) -> None:
        """Put `adapter` in the slot at `scale` (None: no adapter, scale 0), without recompiling the UNet."""
        if adapter is not None and adapter != self.loaded:
            self._load(adapter)
        self.set_scale(0.0 if adapter is None else scale)

    def set_scale(self, scale: float) -> None:
        """peft's set_adapters would put a Python float back in place of each scaling tensor."""
        for name, layer in self._layers():
            layer.scaling[SLOT].copy_(self._unit[name] * scale)

    def _load(self, adapter: str) -> None:
        self.loaded = None  # a failed swap leaves the slot half-written: the next activate loads again
        self.pipeline.load_lora_weights(adapter, adapter_name=SLOT, hotswap=self.created)
        self.created, self.loaded = True, adapter
        self._unit = {name: layer.scaling[SLOT].clone() for name, layer in self._layers()}

    def _layers(self):
        return ((name, module) for name, module in self.pipeline.unet.named_modules()
                if isinstance(module, LoraLayer) and SLOT in module.scaling)


def _readable_rank(adapter: str) -> int | None:
    try:
        return adapter_rank(adapter)
    except Exception:  # unreadable: its model fails to load with the reason
        return None
