"""Where the app's generation runs. The service (checks, PNG saving, run log) calls a backend with a model's name and
gets images back; `LocalBackend` runs the generation core in this process on the registry's device, and
sdtune/app/ray_backend.py's `RayBackend` sends the same call to a Ray Serve replica. Both take the same arguments and
run the same core, so a request gives the same image through either at the same torch thread count."""

import threading

from PIL import Image

from sdtune.generation.core import GenerationSettings, Preview, images_to_images, text_to_images
from sdtune.generation.registry import ModelRegistry


class LocalBackend:
    """The registry's pipelines in this process: one generation at a time on one device."""

    concurrency = 1  # generating requests the app runs at once: the device runs one at a time anyway

    def __init__(self, registry: ModelRegistry):
        self.registry, self.device = registry, registry.device  # the device generation runs on

    def load(self, model: str, lora_scale: float | None = None) -> None:
        """Load `model` now (raises ModelUnavailable), so that a model that cannot load fails before a run starts."""
        self.registry.get(model, lora_scale)

    def text_to_images(self, model: str, lora_scale: float | None, prompt: str, seeds: list[int],
                       settings: GenerationSettings, stop: threading.Event | None = None,
                       preview: Preview | None = None) -> list[Image.Image]:
        return text_to_images(self.registry.get(model, lora_scale), prompt, seeds, settings, stop, preview)

    def images_to_images(self, model: str, lora_scale: float | None, images: list[Image.Image], prompts: list[str],
                         seeds: list[int], settings: GenerationSettings, resolution: int,
                         stop: threading.Event | None = None, preview: Preview | None = None) -> list[Image.Image]:
        return images_to_images(self.registry.get(model, lora_scale), images, prompts, seeds, settings, resolution,
                                stop, preview)

    def status(self) -> str | None:
        """A line on the generation workers for the app to show; the local backend has none beyond the models'."""
        return None
