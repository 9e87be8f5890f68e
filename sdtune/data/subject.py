"""Subject training's two folders (DreamBooth): the instance images of the subject and the class images of its kind.

Each folder is read by the project's one listing rule (folders.list_images) and every image is decoded once when the
flags are checked, so a bad folder stops the run before any model loads. Torch-free: the flag check imports it.
"""

from dataclasses import dataclass
from pathlib import Path

from sdtune.data.folders import IMAGE_SUFFIXES, list_images, printable
from sdtune.data.images import BadImageError, open_image
from sdtune.errors import SdtuneError

EXAMPLE_NAMES = 3  # broken files named per error
GENERATED_PREFIX = "class-"  # generated class images: class-00000.png, class-00001.png...


@dataclass(frozen=True)
class SubjectImage:
    path: Path
    size: tuple[int, int]  # (width, height) of the decoded image


def subject_images(folder, flag: str, limit: int | None = None, must_exist: bool = True) -> list[SubjectImage]:
    """The images of `folder` (the first `limit` in name order), each decoded once; refuses a missing folder, a
    folder without images and any image that does not decode, naming `flag` and the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        if not must_exist:
            return []
        raise SdtuneError(f"{flag} {folder}: no such folder. Give the folder that holds the images.")
    listed = list_images(folder)[:limit]
    refused = [image.key for image in listed if image.error]
    images, broken = [], []
    for image in listed:
        if image.error:
            continue
        try:
            images.append(SubjectImage(image.path, _decoded_size(image.path)))
        except BadImageError as error:
            broken.append(f"{printable(image.key)} ({error})")
    if refused:
        raise SdtuneError(f"{flag} {folder}: {', '.join(map(printable, refused[:EXAMPLE_NAMES]))} link(s) to files "
                          "outside the folder: copy the images in instead.")
    if broken:
        raise SdtuneError(f"{flag} {folder}: {len(broken)} file(s) do not decode as images: "
                          f"{'; '.join(broken[:EXAMPLE_NAMES])}. Replace or remove them.")
    return images


def _decoded_size(path: Path) -> tuple[int, int]:
    """Decoded fully: a truncated file fails here, not in a data worker steps into the run."""
    return open_image(path).size


def instance_images(folder) -> list[SubjectImage]:
    """--instance_data_dir's images: at least one."""
    images = subject_images(folder, "--instance_data_dir")
    if not images:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise SdtuneError(f"--instance_data_dir {folder}: no images ({suffixes}) in the folder. Put 3 to 30 "
                          "pictures of your subject there.")
    return images


def class_images(folder, num_class_images: int) -> list[SubjectImage]:
    """--class_data_dir's first --num_class_images images (the folder may not exist yet: it is filled by
    generation)."""
    return subject_images(folder, "--class_data_dir", limit=num_class_images, must_exist=False)


def generated_name(index: int) -> str:
    """The file name of generated class image `index`: its seed comes from the index, so a name is one image."""
    return f"{GENERATED_PREFIX}{index:05d}.png"
