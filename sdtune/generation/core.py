"""The generation core: one place that turns (pipeline, prompt, seed, settings) into images.

Validation during training, the app, the batch CLI and metrics.py all call it, so the same model, prompt, seed and
settings give the same image everywhere (batched calls agree with single ones up to float rounding: at most one
level of 255 on a few pixels).
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import diffusers
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.generation.preview import is_preview_step, latent_preview
from sdtune.generation.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from sdtune.limits import GUIDANCE_SCALE_RANGE, MAX_SIDE, STEPS_RANGE
from sdtune.seeds import cpu_generator


class GenerationError(SdtuneError, ValueError):
    """Settings that cannot produce an image; the message names the setting."""


class Interrupted(RuntimeError):
    """Generation stopped on request between denoising steps."""


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample; every instance is checked when built, so a bad setting fails before any model time."""
    num_inference_steps: int = 25
    guidance_scale: float = 7.5  # classifier-free guidance; 1 turns it off
    width: int = 512  # a multiple of 8 (the VAE's downsampling), at most MAX_SIDE
    height: int = 512
    negative_prompt: str | None = None
    scheduler: str = DEFAULT_SCHEDULER
    strength: float = 0.75  # image to image only: how far from the input image to go (1 = ignore it)

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_args(cls, args=None, **values) -> "GenerationSettings":
        """Settings from command-line args (an argparse Namespace) and/or a form's values, converted to their
        types and checked. Names that are not settings (--input, --seed...) are ignored; missing ones default."""
        given = {**(vars(args) if args is not None else {}), **values}
        converted = {}
        for setting in fields(cls):
            value = given.get(setting.name)
            if value is not None:
                converted[setting.name] = _convert(setting.name, value, CONVERTERS[setting.name])
        return cls(**converted)

    def validate(self, image_to_image: bool = False) -> None:
        """Refuse settings that would fail deep inside diffusers or silently do nothing."""
        if not STEPS_RANGE[0] <= self.num_inference_steps <= STEPS_RANGE[1]:
            raise GenerationError(f"num_inference_steps must be at least {STEPS_RANGE[0]} and at most "
                                  f"{STEPS_RANGE[1]}, not {self.num_inference_steps}.")
        low, high = GUIDANCE_SCALE_RANGE
        if not low <= self.guidance_scale <= high:  # also refuses NaN
            raise GenerationError(f"guidance_scale must be a finite number, {low:g} or more and at most {high:g}, "
                                  f"not {self.guidance_scale}.")
        if not 0 < self.strength <= 1:  # also refuses NaN
            raise GenerationError(f"strength must be in (0, 1], not {self.strength}.")
        if self.scheduler not in SCHEDULERS:
            raise GenerationError(f"Unknown scheduler '{self.scheduler}'; choose from {', '.join(SCHEDULERS)}.")
        for name, side in (("width", self.width), ("height", self.height)):
            if side % 8 or not 8 <= side <= MAX_SIDE:
                raise GenerationError(f"{name} must be a multiple of 8 from 8 to {MAX_SIDE}, not {side}.")
        if image_to_image and int(self.num_inference_steps * self.strength) < 1:
            raise GenerationError(
                f"strength {self.strength} x {self.num_inference_steps} steps runs no denoising step and "
                f"would return the input unchanged: raise strength to at least {1 / self.num_inference_steps:.3g}"
                " or add steps.")

    def sized(self, width: int, height: int) -> "GenerationSettings":
        return replace(self, width=width, height=height)


def _whole_number(value) -> int:
    """int(value) for 25 or 25.0; a fraction (25.5) or text is refused rather than truncated."""
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"{value} is not a whole number")
    return int(number)


def _text_or_none(value) -> str | None:
    return str(value) or None


CONVERTERS = {"num_inference_steps": _whole_number, "guidance_scale": float, "width": _whole_number,
              "height": _whole_number, "negative_prompt": _text_or_none, "scheduler": str, "strength": float}


def _convert(name: str, value, converter):
    try:
        return converter(value)
    except (TypeError, ValueError, OverflowError) as error:
        raise GenerationError(f"{name}: {value!r} is not a valid value ({error}).") from error


def scheduler_class(name: str):
    """The diffusers scheduler class of a sampler name."""
    if name not in SCHEDULERS:
        raise GenerationError(f"Unknown scheduler '{name}'; choose from {', '.join(SCHEDULERS)}.")
    return getattr(diffusers, SCHEDULERS[name][0])


def make_scheduler(name: str, config):
    return scheduler_class(name).from_config(config)


def for_call(pipeline_class, pipeline, scheduler: str):
    """A pipeline view with its own scheduler (schedulers keep per-call state); weights are shared, not copied.

    Not diffusers' `from_pipe(pipeline, scheduler=...)`: in diffusers 0.42 it ends with `.to(dtype)` on the shared
    modules, which casts an fp16 pipeline's weights to fp32 in place unless a dtype is passed, and logs "There are
    modules in UNet2DConditionModel that should be kept in float32" for the UNet and the VAE on every call."""
    components = dict(pipeline.components, scheduler=make_scheduler(scheduler, pipeline.scheduler.config))
    # carry the model's own safety-checker setting over, or every view would warn about a missing checker
    view = pipeline_class(**components, requires_safety_checker=pipeline.config.get("requires_safety_checker", True))
    view.set_progress_bar_config(disable=True)
    return view


Preview = Callable[[int, list[Image.Image]], None]  # (denoising steps done, one preview per image of the call)


def step_end_callback(stop: threading.Event | None, preview: Preview | None = None,
                      sizes: list[tuple[int, int]] | None = None):
    """A diffusers step-end callback that stops the denoising loop once `stop` is set, and hands `preview` a picture
    of the latents, at `sizes`, every few steps. The latents are read, never changed: the final image is the same."""
    def on_step_end(pipeline, step, timestep, tensors):
        if stop is not None and stop.is_set():
            pipeline._interrupt = True  # diffusers checks this flag before each step
        elif preview is not None and is_preview_step(step + 1, pipeline.num_timesteps):
            # with classifier-free guidance the pipeline doubles the batch inside the step; these latents are not
            preview(step + 1, latent_preview(pipeline.vae).images(tensors["latents"], sizes))
        return tensors
    return on_step_end


@torch.no_grad()
def text_to_images(pipeline, prompt: str, seeds: list[int], settings: GenerationSettings,
                   stop: threading.Event | None = None, preview: Preview | None = None) -> list[Image.Image]:
    """One image per seed for one prompt, in one batch; each image from its own generator."""
    view = for_call(StableDiffusionPipeline, pipeline, settings.scheduler)
    result = view(
        prompt=prompt, negative_prompt=settings.negative_prompt, num_images_per_prompt=len(seeds),
        num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
        width=settings.width, height=settings.height, generator=[cpu_generator(s) for s in seeds],
        callback_on_step_end=step_end_callback(stop, preview, [(settings.width, settings.height)] * len(seeds)),
        callback_on_step_end_tensor_inputs=["latents"],
    )
    if stop is not None and stop.is_set():
        raise Interrupted("Generation stopped.")
    return result.images


def text_to_image(pipeline, prompt: str, seed: int, settings: GenerationSettings, stop=None) -> Image.Image:
    return text_to_images(pipeline, prompt, [seed], settings, stop)[0]


def working_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """Scale (width, height) so the longer side is `resolution`, each side rounded to a multiple of 8."""
    width, height = size
    scale = resolution / max(width, height)
    return tuple(max(8, int(round(side * scale / 8)) * 8) for side in (width, height))


@torch.no_grad()
def images_to_images(pipeline, images: list[Image.Image], prompts: list[str], seeds: list[int],
                     settings: GenerationSettings, resolution: int,
                     stop: threading.Event | None = None, preview: Preview | None = None) -> list[Image.Image]:
    """Image to image for a batch whose inputs share one working size (longer side = `resolution`); each output
    comes back at its input's size, each from its own seed."""
    sizes = {working_size(image.size, resolution) for image in images}
    if len(sizes) != 1:
        raise GenerationError(f"a batch needs one working size, got {sorted(sizes)}")
    width, height = sizes.pop()
    settings = settings.sized(width, height)
    settings.validate(image_to_image=True)
    view = for_call(StableDiffusionImg2ImgPipeline, pipeline, settings.scheduler)
    result = view(
        prompt=prompts, negative_prompt=[settings.negative_prompt or ""] * len(prompts),
        image=[image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS) for image in images],
        strength=settings.strength, num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale, generator=[cpu_generator(seed) for seed in seeds],
        callback_on_step_end=step_end_callback(stop, preview, [(width, height)] * len(images)),
        callback_on_step_end_tensor_inputs=["latents"],
    )
    if stop is not None and stop.is_set():
        raise Interrupted("Generation stopped.")
    return [out.resize(image.size, Image.Resampling.LANCZOS) for out, image in zip(result.images, images)]


def image_to_image(pipeline, image: Image.Image, prompt: str, seed: int, settings: GenerationSettings,
                   resolution: int, stop: threading.Event | None = None) -> Image.Image:
    """One image to image, returned at the input's size."""
    return images_to_images(pipeline, [image], [prompt], [seed], settings, resolution, stop)[0]
