"""Images uploaded for a training job, saved as a training folder under the data root in kohya's layout: each image
with its caption in a same-named `.txt` file beside it (the layout --train_data_dir reads, and the one the Captions
tab edits).

An upload is untrusted: the whole upload is refused beyond MAX_UPLOAD_IMAGES images or MAX_UPLOAD_BYTES bytes; each
image is decoded with the project's safe loader (sdtune/data/images.py, capped at the app's MAX_UPLOAD_PIXELS)
before it is kept, and one that cannot be decoded is skipped and counted. File names are sanitised and each upload
goes into a fresh folder, so nothing already under the data root is overwritten. Captions come from same-named
`.txt` files or a `metadata.jsonl` uploaded with the images, then from the page's caption table, which wins.
"""

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.caption.store import TxtCaptions, one_line
from sdtune.data.captions import CAPTION_SUFFIX, read_caption_file, read_metadata_jsonl
from sdtune.data.folders import IMAGE_SUFFIXES, printable
from sdtune.data.images import BadImageError, open_image
from sdtune.jobs.recipe import sanitise_name
from sdtune.jobs.store import JobError
from sdtune.limits import MAX_UPLOAD_PIXELS

UPLOADS_FOLDER = "uploads"  # DATA_ROOT/uploads/NAME/: one folder an upload
MAX_UPLOAD_IMAGES = 500  # fluxgym takes up to 150; a LoRA of a style rarely needs more than a few hundred
MAX_UPLOAD_BYTES = 2 << 30  # 2 GiB in all; each file is also capped by the app's max_file_size (50 MB)
MAX_CAPTION_FILE_BYTES = 1 << 20  # a caption or metadata file larger than this is no caption
METADATA_NAME = "metadata.jsonl"


@dataclass
class SavedUpload:
    folder: Path
    images: list[str] = field(default_factory=list)  # the kept images' file names
    skipped: list[str] = field(default_factory=list)  # "NAME: reason" for each image not kept
    uncaptioned: int = 0


def split_upload(paths) -> tuple[list[Path], dict[str, str]]:
    """The uploaded images, and the captions uploaded with them (by image stem) from `.txt` files and a
    metadata.jsonl; other files are ignored."""
    images, captions, metadata = [], {}, None
    for path in map(Path, paths or []):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            images.append(path)
        elif suffix == CAPTION_SUFFIX and _small(path):
            captions[path.stem] = read_caption_file(path) or ""
        elif path.name == METADATA_NAME and _small(path):
            metadata = path
    if metadata is not None:  # a .txt beside an image wins over its metadata row, as a folder with both is read
        for row in read_metadata_jsonl(metadata):
            text = row.get("text")
            if isinstance(text, str):
                captions.setdefault(Path(row["file_name"]).stem, text)
    return images, captions


def caption_rows(paths) -> list[list[str]]:
    """The caption table's rows for an upload: [file name, caption] for each image, its uploaded caption filled."""
    images, captions = split_upload(paths)
    return [[path.name, captions.get(path.stem, "")] for path in images]


def save_upload(paths, data_root, name: str, typed: dict[str, str] | None = None) -> SavedUpload:
    """Keep the uploaded images that decode in a fresh DATA_ROOT/uploads/NAME[-N]/ with their captions as `.txt`
    files (`typed`, by file name, over the uploaded ones). Refuses an upload over the caps or with no image."""
    images, captions = split_upload(paths)
    check_caps(images)
    saved = SavedUpload(fresh_folder(Path(data_root) / UPLOADS_FOLDER, sanitise_name(name)))
    try:
        texts = {}
        for path in images:
            kept = _keep_image(path, saved)
            if kept is not None:
                caption = (typed or {}).get(path.name) or captions.get(path.stem, "")
                texts[kept] = one_line(caption)
        if not saved.images:
            raise JobError(f"No image of the upload could be read ({'; '.join(saved.skipped[:3])}): upload PNG or "
                           "JPEG images.")
        TxtCaptions(saved.folder).write({key: text for key, text in texts.items() if text})
        saved.uncaptioned = sum(1 for text in texts.values() if not text)
    except BaseException:
        shutil.rmtree(saved.folder, ignore_errors=True)
        raise
    return saved


def check_caps(images: list[Path]) -> None:
    if not images:
        raise JobError("No images in the upload: add PNG or JPEG files (and their .txt captions or a metadata.jsonl).")
    if len(images) > MAX_UPLOAD_IMAGES:
        raise JobError(f"{len(images)} images uploaded: at most {MAX_UPLOAD_IMAGES} a job. Put a larger set in a "
                       "folder under the data root and choose it there.")
    total = sum(path.stat().st_size for path in images)
    if total > MAX_UPLOAD_BYTES:
        raise JobError(f"The upload holds {total / 2**20:.0f} MiB of images: at most {MAX_UPLOAD_BYTES >> 20} MiB a "
                       "job. Put a larger set in a folder under the data root and choose it there.")


def fresh_folder(parent: Path, name: str) -> Path:
    """PARENT/NAME, or NAME-2, NAME-3... when taken: created here, so two uploads never share a folder."""
    parent.mkdir(parents=True, exist_ok=True)
    for number in range(1, 10_000):
        folder = parent / (name if number == 1 else f"{name}-{number}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise JobError(f"Too many uploads named {name!r}: give the job another name.")


def _keep_image(path: Path, saved: SavedUpload) -> str | None:
    """Copy the image into the folder under a sanitised, unused name if it decodes; else count it as skipped."""
    try:
        open_image(path, max_pixels=MAX_UPLOAD_PIXELS).close()
    except (BadImageError, OSError) as error:
        saved.skipped.append(f"{printable(path.name)}: {error}")
        return None
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._") or "image"
    target = saved.folder / f"{stem}{path.suffix.lower()}"
    number = 2
    while target.exists():
        target = saved.folder / f"{stem}-{number}{path.suffix.lower()}"
        number += 1
    shutil.copyfile(path, target)  # the bytes as uploaded: decoding checked them, re-encoding would lose quality
    saved.images.append(target.name)
    return target.name


def _small(path: Path) -> bool:
    return path.stat().st_size <= MAX_CAPTION_FILE_BYTES


def summary_line(saved: SavedUpload, shown_root: str) -> str:
    """What became of an upload, for the page: the folder under the data root, kept, skipped and uncaptioned."""
    line = f"{len(saved.images)} images saved in {shown_root}/{UPLOADS_FOLDER}/{saved.folder.name}"
    if saved.skipped:
        line += f"; {len(saved.skipped)} skipped ({'; '.join(saved.skipped[:5])})"
    if saved.uncaptioned:
        line += (f"; {saved.uncaptioned} without a caption (text-to-image training skips them; subject training "
                 "uses its instance prompt)")
    return line + "."

