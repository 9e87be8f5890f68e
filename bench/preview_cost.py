"""What live previews cost: the tiny world's stock model at its settings (64 px, 25 steps), text to image with and
without previews, same seeds, taking turns in one run; the ratio of the medians is the cost.

The previews go where the app sends them: through sdtune.app.streaming.stream, each encoded as a PNG as Gradio does."""

import argparse
import io
import statistics
import threading
import time
from functools import partial

from sdtune.app.streaming import stream
from sdtune.generation.core import GenerationSettings, text_to_images
from sdtune.generation.registry import ModelRegistry, ModelSpec

PROMPT = "a red circle on a white background"


def as_png(step, images) -> int:
    """Bytes of the previews as PNGs, the work Gradio does for each one it shows."""
    buffers = [io.BytesIO() for _ in images]
    for image, buffer in zip(images, buffers):
        image.save(buffer, format="PNG")
    return sum(buffer.tell() for buffer in buffers)


def timed(pipeline, seed: int, settings: GenerationSettings, previews: bool) -> float:
    start = time.perf_counter()
    if previews:
        call = partial(text_to_images, pipeline, PROMPT, [seed], settings, None)
        shown = list(stream(call, as_png, threading.Event()))
        assert len(shown) == 4, shown  # 25 steps: previews after steps 5, 10, 15 and 20
    else:
        text_to_images(pipeline, PROMPT, [seed], settings)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tinyworld/stock", help="pipeline folder")
    parser.add_argument("--rounds", type=int, default=30, help="generations per mode, taking turns")
    args = parser.parse_args(argv)
    pipeline = ModelRegistry([ModelSpec("stock", args.model)], device="cpu").get("stock")
    settings = GenerationSettings(num_inference_steps=25, width=64, height=64)
    timed(pipeline, 0, settings, previews=True)  # warm-up
    times = {False: [], True: []}
    for seed in range(args.rounds):
        for previews in ((False, True) if seed % 2 else (True, False)):  # alternate which goes first
            times[previews].append(timed(pipeline, seed, settings, previews))
    plain, shown = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.rounds} images per mode, 64 px, 25 steps, 4 previews per image")
    print(f"without previews: {plain * 1000:.1f} ms/image (median)")
    print(f"with previews:    {shown * 1000:.1f} ms/image (median)")
    print(f"ratio: {shown / plain:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
