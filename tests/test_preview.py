"""Live previews: the fitted latent->RGB map, previews during generation, and their streaming to a handler."""

import threading
import time
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.app import streaming
from sdtune.app.service import BatchUpdate, Outcome
from sdtune.app.streaming import stream
from sdtune.app.ui.handlers import Handlers
from sdtune.errors import SdtuneError
from sdtune.generation.core import GenerationSettings, images_to_images, text_to_images
from sdtune.generation.preview import is_preview_step, latent_preview
from sdtune.generation.registry import ModelRegistry, ModelSpec


def test_previews_come_about_five_times_an_image_and_never_at_the_last_step():
    assert [done for done in range(1, 26) if is_preview_step(done, 25)] == [5, 10, 15, 20]
    assert [done for done in range(1, 4) if is_preview_step(done, 3)] == [1, 2]
    assert not is_preview_step(1, 1)


def test_the_map_previews_a_colour_patch_near_the_vaes_decode():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained("tinyworld/stock/vae").eval()  # a trained VAE: its decode has the colours
    patch = Image.new("RGB", (64, 64), (128, 128, 128))
    patch.paste((220, 40, 40), (16, 16, 48, 48))
    pixels = torch.from_numpy(np.array(patch)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode()
        decoded = ((vae.decode(latents).sample[0].permute(1, 2, 0) + 1) * 127.5).numpy()
    preview = np.asarray(latent_preview(vae).images(latents * vae.config.scaling_factor, [(64, 64)])[0], float)
    for window in (np.s_[24:40, 24:40], np.s_[:8, :8]):  # the patch's middle, the background's corner
        assert np.abs(preview[window].mean((0, 1)) - decoded[window].mean((0, 1))).max() < 45


def test_previews_leave_the_final_images_unchanged(tiny_pipeline):
    pipeline = ModelRegistry([ModelSpec("stock", str(tiny_pipeline))], device="cpu").get("stock")
    settings = GenerationSettings(num_inference_steps=3, width=64, height=64)
    shown = []
    with_previews = text_to_images(pipeline, "a red circle", [1, 2], settings, preview=lambda *args: shown.append(args))
    plain = text_to_images(pipeline, "a red circle", [1, 2], settings)
    assert [image.tobytes() for image in with_previews] == [image.tobytes() for image in plain]
    assert [step for step, _ in shown] == [1, 2]  # the un-doubled batch (guidance on): one preview per image
    assert all([image.size for image in images] == [(64, 64)] * 2 for _, images in shown)
    inputs = [Image.new("RGB", (80, 48), "red"), Image.new("RGB", (80, 48), "blue")]
    edits = []
    images_to_images(pipeline, inputs, ["a", "b"], [1, 2], settings.sized(64, 64), 64,
                     preview=lambda step, images: edits.append(images))
    assert [image.size for image in edits[0]] == [(64, 40)] * 2  # at the working size, not the upload's


def test_stream_yields_previews_as_they_come_then_returns_or_raises():
    def call(show):
        show(1, "a")
        show(2, "b")
        return "result"

    previews = stream(call, lambda step, images: (step, images), threading.Event())
    assert list(previews) == [(1, "a"), (2, "b")]
    with pytest.raises(StopIteration) as done:
        next(stream(lambda show: "result", print, threading.Event()))
    assert done.value.value == "result"
    error = gr.Error("bad request")
    with pytest.raises(gr.Error) as raised:
        list(stream(lambda show: (_ for _ in ()).throw(error), print, threading.Event()))
    assert raised.value is error  # the worker's own exception


def test_a_stream_closed_early_stops_its_generation():
    # a cancelled event or a browser gone away closes the handler: its worker must not run on beside the next request
    stop = threading.Event()

    def call(show):
        while not stop.wait(0.01):
            show(0, "still drawing")
        return "stopped"

    previews = stream(call, lambda step, images: images, stop)
    assert next(previews) == "still drawing"
    previews.close()
    assert stop.wait(1)


def test_a_stream_with_nothing_to_show_still_yields_so_that_a_cancel_reaches_it(monkeypatch):
    # a Ray replica sends no previews: Gradio can close a handler (and so set its Stop flag) only between yields
    monkeypatch.setattr(streaming, "IDLE_SECONDS", 0.05)
    stop = threading.Event()
    previews = stream(lambda show: "stopped" if stop.wait(10) else "ran to the end", print, stop)
    started = time.monotonic()
    assert next(previews) == gr.skip() and time.monotonic() - started < 5  # every output left as it is
    previews.close()
    assert stop.is_set()


class PreviewingService:
    """Shows one preview, then returns or fails as told."""

    def __init__(self, error=None):
        self.error = error

    def text2img(self, prompt, model, seed, num_images, settings, stop, lora_scale, preview):
        preview(1, [Image.new("RGB", (8, 8))])
        if self.error:
            raise self.error
        return Outcome(["out.png"], [seed], {"run": 1})

    def random_batch(self, items, models, prompt, seed, settings, resolution, stop, preview):
        yield BatchUpdate(1, 2, [SimpleNamespace(output="a.png", model="m", prompt="p", file="a", seed=1,
                                                 seconds=0.1, error="")])
        preview(1, [Image.new("RGB", (8, 8))])
        yield BatchUpdate(2, 2, [], run={"done": True})


T2I = ("x", "", "stock", "dpmsolver++", 4, 7.5, 64, 64, 7, 1, SimpleNamespace(session_hash="s"))


def test_handlers_yield_a_preview_before_the_result_and_pass_on_worker_errors():
    outputs = list(Handlers(PreviewingService()).text2img(*T2I))
    assert len(outputs) == 2 and isinstance(outputs[0][0][0], Image.Image) and outputs[0][1:] == (gr.skip(),) * 2
    assert outputs[-1] == (["out.png"], 7, {"run": 1})
    with pytest.raises(gr.Error, match="no such model"):
        list(Handlers(PreviewingService(SdtuneError("no such model"))).text2img(*T2I))
    batch = list(Handlers(PreviewingService()).random_batch(["a.png"], "", ["m"], "", 0, 0.6, 4, 7.5, "dpmsolver++",
                                                            0, T2I[-1], progress=lambda *args, **kwargs: None))
    finished, in_flight = batch[0][0], batch[1][0]
    assert in_flight[:-1] == finished and in_flight[-1][1] == "in progress: step 1"  # after the finished images
    assert batch[-1][3] == {"done": True}
