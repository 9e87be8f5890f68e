"""Seeds derived from names, not positions: the same input gets the same seed and model whatever the order of the
inputs, the number of processes or a restart."""

import hashlib

from sdtune.errors import SdtuneError

SEED_LIMIT = 2**32  # every seed is 0 <= seed < 2**32: what derive_seed produces and what a user may give


def check_seed(seed) -> int:
    """`seed` as an int, refused (not wrapped or overflowed) outside 0 <= seed < 2**32."""
    try:
        whole = int(seed)
    except (TypeError, ValueError, OverflowError):
        whole = None
    if whole is None or whole != seed or not 0 <= whole < SEED_LIMIT:
        raise SdtuneError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}, not {seed!r}.")
    return whole


def derive_seed(*parts) -> int:
    """A 32-bit seed from any parts (a base seed, a prompt or file name, an index...)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_LIMIT


def prompt_seed(seed: int, prompt: str, index: int) -> int:
    """The seed of image `index` of `prompt`: tied to the prompt's text, not its line in a file."""
    return derive_seed(seed, prompt, index)


def draw_model(seed: int, key: str, models: list[str]) -> str:
    """The model an input gets in a random-model batch: drawn from (batch seed, input name) alone."""
    if not models:
        raise ValueError("No models to draw from.")
    return models[derive_seed(seed, key, "model") % len(models)]


def image_seed(seed: int, key: str) -> int:
    """The generation seed of an input in a batch."""
    return derive_seed(seed, key, "seed")
