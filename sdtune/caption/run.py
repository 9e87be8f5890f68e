"""Caption a folder: list its images, keep the captions it has, caption the rest batch by batch, write as it goes."""

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sdtune.caption.captioners import load_captioner
from sdtune.caption.spec import CaptionerSpec
from sdtune.caption.store import caption_store
from sdtune.data.captions import CaptionFileError
from sdtune.data.folders import IMAGE_SUFFIXES, InputImage, list_images, printable
from sdtune.data.images import BadImageError, open_image, to_rgb
from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)
EXAMPLE_NAMES = 3  # file names shown per cause of skipping


@dataclass
class CaptionSummary:
    captioned: int = 0
    kept: int = 0  # images that already had a caption
    skipped: Counter = field(default_factory=Counter)  # cause -> count
    skipped_names: dict[str, list[str]] = field(default_factory=dict)  # cause -> the first few files' names

    def skip(self, cause: str, name: str) -> None:
        self.skipped[cause] += 1
        names = self.skipped_names.setdefault(cause, [])
        if len(names) < EXAMPLE_NAMES:
            names.append(printable(name))

    def text(self) -> str:
        line = f"Captioned {self.captioned}, kept {self.kept} existing, skipped {sum(self.skipped.values())}."
        causes = [f"  {count} {cause}: {', '.join(self.skipped_names[cause])}"
                  + (", ..." if count > EXAMPLE_NAMES else "") for cause, count in self.skipped.most_common()]
        return "\n".join([line, *causes])


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def images_to_caption(images: list[InputImage], store, overwrite: bool, summary: CaptionSummary) -> list[InputImage]:
    """The images that need a caption; the others are counted as kept or skipped."""
    todo = []
    for image in images:
        if image.error:
            summary.skip("refused (a link outside the folder)", image.key)
            continue
        try:
            has_caption = not overwrite and store.existing(image.key) is not None
        except CaptionFileError:
            # its caption file is left as it is: rewriting it would lose what the user wrote
            summary.skip("caption file not UTF-8 (save it as UTF-8, or --overwrite)", image.key)
            continue
        if has_caption:
            summary.kept += 1
        else:
            todo.append(image)
    return todo


def decode_batch(batch: list[InputImage], summary: CaptionSummary) -> tuple[list[str], list]:
    """The keys and RGB images of the batch's readable files; the others are counted by cause."""
    keys, pictures = [], []
    for image in batch:
        try:
            pictures.append(to_rgb(open_image(image.path.read_bytes())))
            keys.append(image.key)
        except BadImageError as error:
            summary.skip("zero-byte file" if "0 bytes" in str(error) else "undecodable image", image.key)
            logger.debug("%s skipped: %s", printable(image.key), error)
        except OSError as error:
            summary.skip("unreadable file", image.key)
            logger.debug("%s skipped: %s", printable(image.key), error)
    return keys, pictures


def caption_folder(folder, spec: CaptionerSpec, output_format: str, prefix: str = "", suffix: str = "",
                   overwrite: bool = False, batch_size: int = 8) -> CaptionSummary:
    """Caption the images of `folder` that have no caption (all with `overwrite`), writing after each batch."""
    images = list_images(folder)
    if not images:
        raise SdtuneError(f"No images in {folder} or its subfolders (looked for {', '.join(sorted(IMAGE_SUFFIXES))}"
                          "; hidden files are left out).")
    store = caption_store(folder, output_format)
    summary = CaptionSummary()
    todo = images_to_caption(images, store, overwrite, summary)
    if not todo:
        return summary
    check_writable(folder, todo, output_format)
    captioner = load_captioner(spec)  # only when there is work: a finished folder loads no model
    with tqdm(total=len(todo), unit="image", desc="Captioning") as progress:
        for start in range(0, len(todo), batch_size):
            keys, pictures = decode_batch(todo[start:start + batch_size], summary)
            if pictures:
                write_captions(store, keys, captioner.caption(pictures), prefix, suffix, summary)
            progress.update(len(todo[start:start + batch_size]))
    return summary


def write_captions(store, keys: list[str], captions: list[str], prefix: str, suffix: str,
                   summary: CaptionSummary) -> None:
    """Write the batch's captions with the prefix and suffix; an empty caption is not one, so its image is counted
    as skipped and captioned again by the next run."""
    written = {}
    for key, caption in zip(keys, captions):
        if caption.strip():
            written[key] = f"{prefix}{caption.strip()}{suffix}"
        else:
            summary.skip("empty caption from the captioner", key)
    if written:
        store.write(written)
        summary.captioned += len(written)


def check_writable(folder, todo: list[InputImage], output_format: str) -> None:
    """Refuse a read-only destination before a model is loaded, naming the folder."""
    folders = {Path(folder)} if output_format == "jsonl" else {image.path.parent for image in todo}
    for destination in sorted(folders):
        probe = destination / f".sdtune-caption-probe-{os.getpid()}"  # hidden: never listed
        try:
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise SdtuneError(f"Cannot write captions in {printable(str(destination))}: {error.strerror or error}. "
                              "Make the folder writable.") from error
