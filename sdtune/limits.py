"""What one generation request may ask for. Plain numbers, importable by command lines before any heavy library."""

import math

from sdtune.errors import SdtuneError

MAX_SIDE = 1024  # width/height cap: beyond it SD v1 repeats itself and memory grows with the square
MAX_IMAGES = 8  # images per text-to-image request
MAX_UPLOAD_PIXELS = 4096 * 4096  # larger uploads are refused before decoding (decompression bombs)
# The most work one request may ask for, in megapixel-steps (width x height x denoising steps x images / 10^6; a
# 512x512 image at 30 steps is 7.9). The device runs one request at a time and Stop acts only between steps, so
# one request must not hold it for long: a CPU takes seconds per megapixel-step, a GPU a small fraction of one.
DEFAULT_MAX_REQUEST_COST = {"cpu": 8.0, "mps": 64.0, "cuda": 512.0}
BATCH_SIZE = 4  # images per pipeline call in a random-model batch, the CLI's default and the app's batch tab's
# The sampling settings' ranges, one each for the app's controls, its Compare axes, PNG info and the command lines.
# Steps: the schedulers here (DPM++ 2M, Euler a, DDIM) settle within a few dozen. Guidance: past 20 SD v1's colours
# saturate and its images fall apart.
STEPS_RANGE = (1, 100)
GUIDANCE_SCALE_RANGE = (0.0, 20.0)
MAX_COMPARE_CELLS = 64  # images in one comparison grid (models x values): 8 x 8, A1111's X/Y plots rarely hold more

SEED_LIMIT = 2**32  # seeds are 0 <= seed < 2**32: what a user may give, derive_seed makes and the PNGs record


def check_seed(seed) -> int:
    """`seed` as an int, refused (not wrapped or overflowed) outside 0 <= seed < 2**32."""
    try:
        whole = int(seed)
    except (TypeError, ValueError, OverflowError):
        whole = None
    if whole is None or whole != seed or not 0 <= whole < SEED_LIMIT:
        raise SdtuneError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}, not {seed!r}.")
    return whole


def check_whole(value, name: str) -> int:
    """`value` as an int when it is a whole number (2 or 2.0), refused when it is a fraction or not a number: a
    request for 2.7 images is a mistake to say, not to round."""
    try:
        whole = int(value)
    except (TypeError, ValueError, OverflowError):
        whole = None
    if whole is None or whole != value:
        raise SdtuneError(f"{name} must be a whole number, not {value!r}.")
    return whole


# How much of a LoRA adapter a request may apply: 0 is the base model, 1 the adapter as trained. A1111's "Preferred
# weight" of a LoRA goes from 0 to 2; negative scales subtract the adapter (the opposite style), and beyond 2 the
# adapter's update dominates the base and the images fall apart.
LORA_SCALE_RANGE = (-2.0, 2.0)


def check_lora_scale(scale, name: str = "lora_scale") -> float:
    """`scale` as a float, refused when it is not a finite number in LORA_SCALE_RANGE."""
    try:
        value = float(scale)
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    low, high = LORA_SCALE_RANGE
    if not low <= value <= high:  # also refuses NaN
        raise SdtuneError(f"{name} must be a number from {low:g} to {high:g} (0 = the base model, 1 = the adapter "
                          f"as trained), not {scale!r}.")
    return value
