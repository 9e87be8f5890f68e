"""metrics.py --reference_images: the CLIP image embeddings of a folder of target-domain images, and of the
generated ones, for CMMD (sdtune/evaluation/cmmd.py).

The folder is listed by the rule every image folder follows here (sdtune/data/folders.py); a file that cannot be
read is skipped and counted, not fatal: one bad file among thousands of references should not stop a scoring run.
Images are decoded and embedded a batch at a time, so a large reference folder never sits in memory.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdtune.data.folders import InputImage, list_images, printable
from sdtune.data.images import BadImageError, open_image, to_rgb
from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

EMBEDDING_BATCH = 32
EXAMPLE_NAMES = 3  # skipped file names shown in the log


@dataclass
class ReferenceSet:
    folder: str
    listed: list[InputImage]
    embeddings: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)  # names of the files that could not be read


def list_reference(folder: str, flag: str = "--reference_images") -> ReferenceSet:
    """The folder's image files, listed before any model loads: a wrong or empty folder fails at once, naming
    `flag`."""
    if not Path(folder).is_dir():
        raise SdtuneError(f"{flag} {folder}: not a folder (give a folder of images).")
    listed = list_images(folder)
    if not listed:
        raise SdtuneError(f"{flag} {folder}: no images found (suffixes .png, .jpg, .webp, ...).")
    return ReferenceSet(folder, listed)


def embed_images(scorer, images) -> np.ndarray:
    """Unit-length CLIP image embeddings, one a row, computed a batch at a time."""
    batches = [images[start:start + EMBEDDING_BATCH] for start in range(0, len(images), EMBEDDING_BATCH)]
    return np.concatenate([scorer.image_embeddings(batch).double().cpu().numpy() for batch in batches])


def embed_reference(reference: ReferenceSet, scorer) -> ReferenceSet:
    """Decode and embed the listed files; unreadable ones are skipped and named in the log."""
    chunks = []
    for start in range(0, len(reference.listed), EMBEDDING_BATCH):
        batch = reference.listed[start:start + EMBEDDING_BATCH]
        images = [image for image in (decode_or_skip(item, reference.skipped) for item in batch) if image is not None]
        if images:
            chunks.append(embed_images(scorer, images))
    if reference.skipped:
        logger.warning("--reference_images: skipped %d unreadable file(s): %s", len(reference.skipped),
                       ", ".join(reference.skipped[:EXAMPLE_NAMES]))
    if not chunks:
        raise SdtuneError(f"--reference_images {reference.folder}: none of its {len(reference.listed)} image files "
                          "could be read.")
    reference.embeddings = np.concatenate(chunks)
    return reference


def decode_or_skip(image: InputImage, skipped: list[str]):
    """The file as RGB, or None (its name added to `skipped`) when it is refused or cannot be decoded."""
    try:
        if image.error:
            raise BadImageError(image.error)
        return to_rgb(open_image(image.path))
    except BadImageError as error:
        skipped.append(printable(image.key))
        logger.debug("reference %s skipped: %s", printable(image.key), error)
        return None
