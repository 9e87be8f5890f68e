"""Training data: load an image-caption dataset, screen out unusable rows, and serve augmented examples.

Every random choice of an example (caption pick, caption dropout, flip, crop) comes from a generator seeded by
(seed, epoch, row), so an example is the same whichever worker loads it and whether or not the run was resumed.
"""

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtune.data.buckets import cover_size
from sdtune.data.captions import REPEATS_COLUMN, caption_file_rows, is_caption_file_folder
from sdtune.data.images import BadImageError, open_image, to_rgb
from sdtune.errors import SdtuneError
from sdtune.seeds import example_generator, shuffle_generator, split_generator

logger = logging.getLogger(__name__)

POKEMON_DATASET = "lambdalabs/pokemon-blip-captions"
DATASET_ALTERNATIVES = (
    "The dataset could not be loaded from the hub ({error}).\n"
    "lambdalabs/pokemon-blip-captions was taken down in 2024. Alternatives:\n"
    "  - a community mirror, e.g. --dataset_name svjack/pokemon-blip-captions-en-zh --caption_column en_text\n"
    "  - a similar set, e.g. --dataset_name lambdalabs/naruto-blip-captions\n"
    "  - your own copy as a local folder: --train_data_dir DIR (images plus metadata.jsonl with "
    "file_name and text)\n"
    "  - offline: the tiny world's creatures, python -m tinyworld.datasets data/tinyworld, then "
    "--train_data_dir data/tinyworld/pokemon/train (see docs/tinyworld.md)"
)
UNREACHABLE_DATASET = ("Cannot load the dataset '{name}' from the hub ({error}): check the name, the network and "
                       "HF_HUB_OFFLINE, or use a local copy with --train_data_dir DIR.")
EXAMPLE_NAMES = 3  # file names shown per kind of problem


def load_rows(args):
    """The dataset's train split, with images left undecoded so that broken files can be screened one by one."""
    import datasets

    if args.train_data_dir is not None and is_caption_file_folder(args.train_data_dir):
        rows = caption_file_rows(args.train_data_dir, args.image_column, args.caption_column)
    else:
        rows = _load_dataset(args)["train"]
    check_columns(rows.column_names, args)
    rows = rows.cast_column(args.image_column, datasets.Image(decode=False))
    if args.max_train_samples is not None:
        rows = rows.select(range(min(args.max_train_samples, len(rows))))
    folder = args.train_data_dir or (args.dataset_name if os.path.isdir(args.dataset_name) else None)
    if folder is not None:
        check_files_exist(rows[args.image_column], folder)
    return rows


def _load_dataset(args):
    import datasets

    try:
        if args.train_data_dir is not None:
            return load_folder(args.train_data_dir, args.cache_dir, args.caption_column)
        return datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
    except FileNotFoundError as error:
        raise SdtuneError(f"Dataset not found: {error}. Check --train_data_dir or --dataset_name.") from error
    except Exception as error:  # the hub raises many types: offline, gated, removed, no network
        raise SdtuneError(_load_error_message(args, error)) from error


def load_folder(folder: str, cache_dir, caption_column: str):
    """A folder of images and their metadata, as datasets' imagefolder reads it. Its Arrow JSON reader takes one type
    a column, so a metadata.jsonl whose captions are strings in some rows and lists (captions to pick from) in others
    is refused ("changed from string to array"): such a file is read here instead, each caption as a list."""
    import datasets
    import pyarrow

    try:
        return datasets.load_dataset("imagefolder", data_dir=folder, cache_dir=cache_dir)
    except (pyarrow.ArrowInvalid, datasets.exceptions.DatasetGenerationError):
        metadata = Path(folder) / "metadata.jsonl"
        if not metadata.is_file():
            raise
        return datasets.DatasetDict(train=caption_list_rows(metadata, caption_column))


def caption_list_rows(metadata: Path, caption_column: str):
    """The rows of a metadata.jsonl with every caption a list (a string becomes a list of one, which usable_captions
    reads the same) and file_name the image's path."""
    import datasets

    rows = [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise SdtuneError(f"{metadata.name} line {number}: each line must be an object with a file_name.")
        if isinstance(row.get(caption_column), str):
            row[caption_column] = [row[caption_column]]
        row["image"] = str(metadata.parent / row.pop("file_name"))
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())


def _load_error_message(args, error: Exception) -> str:
    text = str(error).strip()
    first_line = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    if args.train_data_dir is not None:
        return f"Cannot read the image folder {args.train_data_dir}: {first_line}"
    if args.dataset_name == POKEMON_DATASET:
        return DATASET_ALTERNATIVES.format(error=first_line)
    return UNREACHABLE_DATASET.format(name=args.dataset_name, error=first_line)


def check_columns(columns: list[str], args) -> None:
    """Refuse an image or caption column the dataset does not have, listing the ones it has."""
    for column, flag in ((args.image_column, "--image_column"), (args.caption_column, "--caption_column")):
        if column not in columns:
            hint = (" A folder's captions come from its metadata.jsonl (or metadata.csv): one row per image with "
                    "file_name and the caption." if args.train_data_dir is not None else "")
            raise SdtuneError(f"Column '{column}' not in the dataset; it has {columns}. Set {flag}.{hint}")


def check_files_exist(image_values, folder: str) -> None:
    """Refuse a metadata file that names images the folder does not have, naming a few of them."""
    missing = [os.path.relpath(value["path"], folder) for value in image_values
               if value.get("bytes") is None and value.get("path") and not os.path.exists(value["path"])]
    if missing:
        raise SdtuneError(f"The metadata of {folder} names {len(missing)} image file(s) that do not exist: "
                          f"{', '.join(missing[:EXAMPLE_NAMES])}. Add the files or remove their rows from "
                          "metadata.jsonl (or metadata.csv).")


def repeat_counts(rows) -> list[int]:
    """How many times an epoch draws each row: kohya's N_name folders' counts, else once."""
    if REPEATS_COLUMN in getattr(rows, "column_names", ()):
        return list(rows[REPEATS_COLUMN])
    return [1] * len(rows)


def usable_captions(caption) -> list[str]:
    """The non-empty captions of a row: a string, or a list of strings to pick from."""
    candidates = caption if isinstance(caption, (list, tuple)) else [caption]
    return [c.strip() for c in candidates if isinstance(c, str) and c.strip()]


def decode_row_image(value) -> Image.Image:
    """Decode an undecoded `datasets.Image` value ({'bytes', 'path'}) to RGB."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    source = (value.get("bytes") or value.get("path")) if isinstance(value, dict) else None
    if source is None:
        raise BadImageError("row has no image")
    if isinstance(source, str) and _is_empty_file(source):
        raise BadImageError("empty file (0 bytes)")
    return to_rgb(open_image(source))


def _is_empty_file(path: str) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) == 0


def row_name(value, index: int) -> str:
    """How the report names a row: its image file's name, or its index when the image came as bytes."""
    path = value.get("path") if isinstance(value, dict) else None
    return os.path.basename(path) if path else f"row {index}"


def pixel_digest(image: Image.Image) -> str:
    """A fingerprint of the decoded pixels: the same picture saved twice, or in two lossless formats, gets the same
    one."""
    return hashlib.blake2b(f"{image.size}".encode() + image.tobytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class ImageFacts:
    """What the screening notes of a usable image, for the data check's report."""

    name: str
    width: int
    height: int
    digest: str  # pixel_digest of the decoded RGB image


@dataclass
class ScreenResult:
    usable: list[int]  # row indices that decode and have a caption
    skipped: Counter  # reason -> count
    skipped_names: dict[str, list[str]] = field(default_factory=dict)  # reason -> the first few rows' names
    images: list[ImageFacts] = field(default_factory=list)  # of the usable rows, in their order

    def summary(self) -> str:
        total = len(self.usable) + sum(self.skipped.values())
        if not self.skipped:
            return f"All {total} rows usable."
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
        return f"Skipped {sum(self.skipped.values())} of {total} rows: {reasons}."

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason] += 1
        names = self.skipped_names.setdefault(reason, [])
        if len(names) < EXAMPLE_NAMES:
            names.append(name)

    def require_usable(self) -> None:
        if not self.usable:
            raise SdtuneError(f"No usable rows in the dataset. {self.summary()} "
                              "Check the image files and the caption column.")


def inspect_rows(rows, image_column: str, caption_column: str) -> ScreenResult:
    """Decode every image once and check every caption; note the usable rows' sizes and pixel digests and count
    the rest by reason."""
    result = ScreenResult([], Counter())
    for index, row in enumerate(rows):
        name = row_name(row[image_column], index)
        if not usable_captions(row[caption_column]):
            result.skip("missing caption" if row[caption_column] is None else "empty caption", name)
            continue
        try:
            image = decode_row_image(row[image_column])
        except BadImageError as error:
            result.skip("zero-byte file" if "0 bytes" in str(error) else "undecodable image", name)
            logger.debug("row %d skipped: %s", index, error)
            continue
        result.usable.append(index)
        result.images.append(ImageFacts(name, *image.size, pixel_digest(image)))
    return result


def screen_rows(rows, image_column: str, caption_column: str) -> ScreenResult:
    """inspect_rows, refusing a dataset with no usable row."""
    result = inspect_rows(rows, image_column, caption_column)
    result.require_usable()
    return result


def hold_out(num_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """--validation_split: the (training, held-out) row positions, a `fraction` of the rows drawn from `seed`, each
    list in row order. Both keep at least one row."""
    held = max(1, round(num_rows * fraction))
    if held >= num_rows:
        raise SdtuneError(f"--validation_split {fraction} of {num_rows} usable rows leaves no row to train on: "
                          "lower it or add rows.")
    order = torch.randperm(num_rows, generator=split_generator(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


# Beyond this many times the target's pixels the whole resized image is never made: a 1x4000 image covering a
# 256x1024 bucket would be 256x1,024,000 pixels (786 MB) at every step.
MAX_COVER_FACTOR = 4


def resize_and_crop(image: Image.Image, size: tuple[int, int], center_crop: bool, generator: torch.Generator):
    """Resize to cover `size` (width, height), the aspect ratio kept, and crop that, centred or at a random offset."""
    covered = cover_size(image.size, size)
    spare_x, spare_y = covered[0] - size[0], covered[1] - size[1]
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(spare_x + 1, (), generator=generator))
        top = int(torch.randint(spare_y + 1, (), generator=generator))
    if covered[0] * covered[1] <= MAX_COVER_FACTOR * size[0] * size[1]:
        return image.resize(covered, Image.Resampling.BILINEAR).crop((left, top, left + size[0], top + size[1]))
    # an extreme aspect ratio: resize only the window kept, mapped back onto the source image
    scale_x, scale_y = image.width / covered[0], image.height / covered[1]
    box = (left * scale_x, top * scale_y, (left + size[0]) * scale_x, (top + size[1]) * scale_y)
    return image.resize(size, Image.Resampling.BILINEAR, box=box)


def to_tensor(image: Image.Image, flip: bool) -> torch.Tensor:
    """RGB image to a CHW float tensor in [-1, 1], optionally mirrored."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if flip:
        array = array[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def shuffle_tags(caption: str, keep: int, generator: torch.Generator) -> str:
    """A tag-style caption ('tag, tag, ...') with its first `keep` tags in place and the others in random order."""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    kept, rest = tags[:keep], tags[keep:]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join(kept + [rest[i] for i in order])


class EpochShuffleSampler(torch.utils.data.Sampler):
    """Yields (epoch, position) keys in an order fixed by (seed, epoch); call set_epoch before each epoch."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        order = torch.randperm(self.num_rows, generator=shuffle_generator(self.seed, self.epoch))
        return iter([(self.epoch, int(position)) for position in order])


class CaptionedImages(torch.utils.data.Dataset):
    """Examples for the training step: pixels and token ids, or cached latent distributions and text embeddings."""

    def __init__(self, rows, args, tokenizer, cache=None, buckets=None):
        """`rows`: the screened rows only (see screen_rows); `cache`: a LatentCache under --cache_latents;
        `buckets`: each row's (width, height) under --enable_bucket (sdtune.data.buckets.assign_buckets).

        An example is a position: a row repeated by kohya's N_name folder is N positions reading the one row (each
        with its own random crop, flip and caption draw), so the row is screened and cached once, not N times."""
        self.rows, self.tokenizer, self.cache = rows, tokenizer, cache
        self.row_of = [row for row, count in enumerate(repeat_counts(rows)) for _ in range(count)]
        self.buckets = None if buckets is None else [buckets[row] for row in self.row_of]  # by position
        self.image_column, self.caption_column = args.image_column, args.caption_column
        self.resolution, self.center_crop, self.random_flip = args.resolution, args.center_crop, args.random_flip
        self.proportion_empty_prompts, self.seed = args.proportion_empty_prompts, args.seed
        self.shuffle_caption, self.keep_tokens = args.shuffle_caption, args.keep_tokens

    def __len__(self) -> int:
        return len(self.row_of)

    def __getitem__(self, key):
        epoch, position = key
        generator = example_generator(self.seed, epoch, position)
        row = self.rows[self.row_of[position]]
        caption = self.pick_caption(row[self.caption_column], generator)
        flip = self.random_flip and uniform(generator) < 0.5
        if self.cache is not None:
            mean, std = self.cache.image_distribution(position, flip)
            return {"latent_mean": mean, "latent_std": std,
                    "encoder_hidden_states": self.cache.text_embedding(caption)}
        image = resize_and_crop(decode_row_image(row[self.image_column]), self.target_size(position),
                                self.center_crop, generator)
        return {"pixel_values": to_tensor(image, flip), "input_ids": self.tokenize(caption)}

    def pick_caption(self, caption_value, generator: torch.Generator) -> str:
        """One caption of the row at random (its tags shuffled under --shuffle_caption), or '' with probability
        --proportion_empty_prompts."""
        captions = usable_captions(caption_value)
        choice = captions[int(torch.randint(len(captions), (), generator=generator))]
        if self.shuffle_caption:
            choice = shuffle_tags(choice, self.keep_tokens, generator)
        return "" if uniform(generator) < self.proportion_empty_prompts else choice

    def tokenize(self, caption: str) -> torch.Tensor:
        return self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids[0]

    def image_at(self, position: int, flip: bool) -> torch.Tensor:
        """The centre-cropped pixels of one example, as cached by --cache_latents."""
        row = self.rows[self.row_of[position]]
        image = resize_and_crop(decode_row_image(row[self.image_column]), self.target_size(position), True, None)
        return to_tensor(image, flip)

    def target_size(self, position: int) -> tuple[int, int]:
        """The (width, height) an example is trained at: its bucket's, or a --resolution square."""
        return self.buckets[position] if self.buckets is not None else (self.resolution, self.resolution)

    def all_captions(self) -> list[str]:
        """Every caption the training can draw, including '' when captions are dropped."""
        captions = {c for value in self.rows[self.caption_column] for c in usable_captions(value)}
        if self.proportion_empty_prompts > 0:
            captions.add("")
        return sorted(captions)
