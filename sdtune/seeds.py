"""Seeds derived from names, not positions: the same input gets the same seed and model whatever the order of the
inputs, the number of processes or a restart."""

import hashlib


def derive_seed(*parts) -> int:
    """A 32-bit seed from any parts (a base seed, a prompt or file name, an index...)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % 2**32


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
