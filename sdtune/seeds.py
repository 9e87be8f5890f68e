"""Every seed of the product, in one place: derived from names and positions, never from a global random stream.

The same input gets the same seed and model whatever the order of the inputs, the number of processes or a restart;
every random draw comes from a CPU generator, whose numbers are the same on every device.
"""

import hashlib
import secrets

import torch

from sdtune.errors import SdtuneError
from sdtune.limits import SEED_LIMIT, check_seed


def derive_seed(*parts) -> int:
    """A 32-bit seed from any parts (a base seed, a prompt or file name, an index...)."""
    # surrogateescape: a file name that is not valid UTF-8 (Linux allows any bytes) still gives its own seed
    text = "\0".join(map(str, parts)).encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") % SEED_LIMIT


def cpu_generator(seed: int) -> torch.Generator:
    """The generator of one seed: CPU noise is identical on every device, so images and trainings are too."""
    return torch.Generator(device="cpu").manual_seed(seed)


def resolve_seed(seed) -> int:
    """The app's seed: -1 (or none) means a fresh random one, any other must pass check_seed; the seed used is
    always returned to the user."""
    if seed is None or seed == -1:
        return secrets.randbelow(SEED_LIMIT)
    try:
        return check_seed(seed)
    except SdtuneError as error:
        raise SdtuneError(f"{error} (-1: a random one)") from error


def step_generator(seed: int, process_index: int, epoch: int, batch_index: int) -> torch.Generator:
    """The training step's draws for one micro-batch on one process: a resumed run draws exactly the same numbers."""
    return cpu_generator(derive_seed(seed, "step", process_index, epoch, batch_index))


def example_generator(seed: int, epoch: int, row: int) -> torch.Generator:
    """The data augmentation's draws for one example in one epoch, whichever worker loads it."""
    return cpu_generator(derive_seed(seed, "example", epoch, row))


def shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    """The order of the rows in one epoch."""
    return cpu_generator(derive_seed(seed, "shuffle", epoch))


def batch_order_generator(seed: int, epoch: int) -> torch.Generator:
    """The order of the aspect-ratio buckets' batches in one epoch."""
    return cpu_generator(derive_seed(seed, "bucket batches", epoch))


def split_generator(seed: int) -> torch.Generator:
    """Which rows --validation_split holds out of training."""
    return cpu_generator(derive_seed(seed, "validation split"))


def validation_loss_generator(row: int) -> torch.Generator:
    """The fixed noise of held-out row `row` in the validation loss. Not derived from --seed: runs with different
    seeds are scored on the same draws, so their validation losses compare."""
    return cpu_generator(derive_seed("validation loss", row))


def validation_seed(seed: int, prompt_index: int, image_index: int = 0, prompts: int = 1) -> int:
    """Validation image `image_index` of prompt `prompt_index` during training: `--seed` + its place in the grid
    (the README says so), not the text-derived seed metrics.py gives the same prompt."""
    return seed + image_index * prompts + prompt_index


def prompt_seed(seed: int, prompt: str, index: int) -> int:
    """metrics.py's image `index` of `prompt`: tied to the prompt's text, not its line in a file."""
    return derive_seed(seed, prompt, index)


def draw_model(seed: int, key: str, models: list[str]) -> str:
    """The model an input gets in a random-model batch: drawn from (batch seed, input name) alone."""
    if not models:
        raise ValueError("No models to draw from.")
    return models[derive_seed(seed, key, "model") % len(models)]


def image_seed(seed: int, key: str) -> int:
    """The generation seed of an input in a batch, the app's batch tab and the batch CLI alike."""
    return derive_seed(seed, key, "seed")
