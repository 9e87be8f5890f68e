"""Captions kept beside the images, as the ecosystem's trainers read them, and the folder that holds them.

Two layouts of a local folder carry captions:
- datasets' imagefolder: a `metadata.jsonl` (or `metadata.csv`) naming each image's file and its caption; read by
  `datasets.load_dataset("imagefolder")`, whose rules stay the reference (sdtune/data/dataset.py).
- kohya's: each image with a same-named `.txt` file beside it, and folders named `N_name` whose images are repeated
  N times an epoch (`10_sks dog/`). Read here: datasets has no loader for it.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sdtune.data.folders import list_images, printable
from sdtune.errors import SdtuneError

CAPTION_SUFFIX = ".txt"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya's "10_sks dog": 10 repeats, the rest is a name
MAX_REPEATS = 1000  # "100000_x" is a typo, not an intent: an epoch of it would never end
REPEATS_COLUMN = "kohya_repeats"  # a kohya folder's rows: how many times an epoch draws each (sdtune.data.dataset)


class CaptionFileError(SdtuneError):
    """A caption file that cannot be read as text."""


def caption_file(image_path) -> Path:
    """The `.txt` file that holds an image's caption in kohya's layout: `cat.png` -> `cat.txt`."""
    return Path(image_path).with_suffix(CAPTION_SUFFIX)


def read_caption_file(path) -> str | None:
    """The caption in a `.txt` file, or None when there is no such file. As kohya's trainers, only the first line
    counts; a byte-order mark (Windows' Notepad writes one) is dropped."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as error:
        raise CaptionFileError(f"The caption file {printable(path.name)} is not UTF-8 text (byte {error.start}): "
                               "save it as UTF-8.") from error
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def repeats_of(key: str) -> int:
    """How many times kohya's layout repeats an image an epoch: N for an image under a top folder `N_name`, else 1."""
    parts = Path(key).parts
    match = REPEAT_FOLDER.match(parts[0]) if len(parts) > 1 else None
    if match is None:
        return 1
    count = int(match.group(1))
    if not 1 <= count <= MAX_REPEATS:
        raise SdtuneError(f"The folder {printable(parts[0])} asks for {count} repeats: kohya's N_name folders take "
                          f"N from 1 to {MAX_REPEATS}. Rename the folder.")
    return count


def metadata_file(folder) -> Path | None:
    """The imagefolder metadata file at the top of `folder`, if it has one."""
    return next((Path(folder, name) for name in METADATA_FILES if Path(folder, name).is_file()), None)


def read_metadata_jsonl(path) -> list[dict]:
    """The rows of a metadata.jsonl, refusing a line that is not a JSON object (naming its number): a file half
    written by another tool must be fixed, not silently shortened."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise CaptionFileError(f"{path.name} is not UTF-8 text (byte {error.start}): save it as UTF-8.") from error
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SdtuneError(f"{path.name} line {number} is not valid JSON ({error.msg}): fix or remove the line."
                              ) from error
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise SdtuneError(f"{path.name} line {number} is not an object with a file_name: fix or remove the line.")
        rows.append(row)
    return rows


@dataclass(frozen=True)
class CaptionedImage:
    """One image of a folder in kohya's layout, with its caption file's text (None when it has none)."""

    key: str  # the path relative to the folder
    path: Path
    caption: str | None
    repeats: int


def caption_file_images(folder) -> list[CaptionedImage]:
    """The images of a folder in kohya's layout with their `.txt` captions and repeat counts. Images refused by the
    folder lister (links outside the folder) are left out, as every reader of a folder does."""
    return [CaptionedImage(image.key, image.path, read_caption_file(caption_file(image.path)), repeats_of(image.key))
            for image in list_images(folder) if not image.error]


def is_caption_file_folder(folder) -> bool:
    """Whether --train_data_dir is in kohya's layout: a folder with no imagefolder metadata file anywhere in it."""
    return Path(folder).is_dir() and not any(path for name in METADATA_FILES for path in Path(folder).rglob(name))


def caption_file_rows(folder, image_column: str, caption_column: str):
    """A training dataset from kohya's layout: one row per image, the image undecoded (path only), so the rows are
    screened like an imagefolder's (each image decoded once), and its repeat count in REPEATS_COLUMN, which the
    training examples expand (CaptionedImages); an image without a caption file is a row without a caption (skipped
    and named by the screening). Refuses a folder with no image or no caption file, saying how to write them."""
    import datasets

    images = caption_file_images(folder)
    if not images:
        raise SdtuneError(f"No images in {folder}: give a folder of images with a metadata.jsonl or same-named .txt "
                          "caption files.")
    if all(image.caption is None for image in images):
        raise SdtuneError(f"No captions in {folder}: it has {len(images)} images but no metadata.jsonl (or "
                          "metadata.csv) and no same-named .txt caption file. Write them with "
                          f"python -m sdtune.caption {folder} (add --format txt for .txt files).")
    features = datasets.Features({image_column: datasets.Image(decode=False), caption_column: datasets.Value("string"),
                                  REPEATS_COLUMN: datasets.Value("int32")})
    return datasets.Dataset.from_dict({image_column: [str(image.path) for image in images],
                                       caption_column: [image.caption for image in images],
                                       REPEATS_COLUMN: [image.repeats for image in images]}, features=features)


def caption_sources(folder) -> tuple[str, ...]:
    """The data check's lines on a --train_data_dir's captions: which file they come from, the images with none,
    and kohya's repeats."""
    if not is_caption_file_folder(folder):
        files = sorted(str(path.relative_to(folder)) for name in METADATA_FILES for path in Path(folder).rglob(name))
        ignored = sum(caption_file(image.path).is_file() for image in list_images(folder))
        note = f" ({ignored} .txt caption files beside the images not read: the metadata comes first)" * bool(ignored)
        return (f"Captions from: {', '.join(files)}{note}.",)
    images = caption_file_images(folder)
    without = [printable(image.key) for image in images if image.caption is None]
    lines = [f"Captions from: {len(images) - len(without)} .txt caption files beside the images (kohya's layout)."]
    if without:
        lines.append(f"Images without a caption file, left out: {len(without)}, e.g. {', '.join(without[:3])} "
                     f"(python -m sdtune.caption {folder} --format txt writes them).")
    repeated = Counter((Path(image.key).parts[0], image.repeats) for image in images if image.repeats > 1)
    if repeated:
        lines.append("Repeats (kohya's N_name folders): "
                     + "; ".join(f"{printable(name)}: {count} images x {repeats}"
                                 for (name, repeats), count in sorted(repeated.items())) + ".")
    return tuple(lines)
