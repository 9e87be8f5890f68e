"""Decoding untrusted image files into plain RGB, whatever their mode, orientation or size."""

import io
import os
import stat
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps

# Refuse decompression bombs: 8192 x 8192 is far above anything Stable Diffusion is trained or run on.
MAX_IMAGE_PIXELS = 8192 * 8192


class BadImageError(ValueError):
    """An input that is not a decodable image of acceptable size."""


def open_image(source, max_pixels: int | None = None) -> Image.Image:
    """Decode a path, bytes or file object fully, with EXIF orientation applied; raise BadImageError if unusable
    or larger than `max_pixels` (default MAX_IMAGE_PIXELS)."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise BadImageError("empty file (0 bytes)")
        source = io.BytesIO(source)
    max_pixels = max_pixels or MAX_IMAGE_PIXELS
    try:
        with regular_file(source) as file, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file)
            _check_size(image, max_pixels)
            image.load()  # decode now: a truncated file must fail here, not later in a worker
            return ImageOps.exif_transpose(image)
    except BadImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise too_large(max_pixels) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise cannot_decode(error, source) from error


def header_size(path, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the file's header alone (cheap, nothing decoded); BadImageError if unusable."""
    with image_header(path, max_pixels) as image:
        return image.size


@contextmanager
def image_header(path, max_pixels: int):
    """The image at `path` opened, not decoded (its size and text chunks are read), and no larger than `max_pixels`;
    BadImageError if unusable."""
    try:
        with regular_file(path) as file, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked against ours
            with Image.open(file) as image:
                _check_size(image, max_pixels)
                yield image
    except BadImageError:
        raise
    except Image.DecompressionBombError as error:
        raise too_large(max_pixels) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise cannot_decode(error, path) from error


def too_large(max_pixels: int) -> BadImageError:
    """Pillow refuses an image of over 179 megapixels when it opens it, before its size can be read: the same
    refusal in this project's words, with its limit (Pillow's would quote Pillow's own)."""
    return BadImageError(f"image too large (more than {max_pixels} pixels)")


@contextmanager
def regular_file(source):
    """A path opened for reading if it is a regular file, else BadImageError: reading a named pipe waits for a
    writer for ever, and a device never ends. O_NONBLOCK makes opening a pipe return at once (reading a regular file
    ignores it). File objects are yielded as they are."""
    if not isinstance(source, (str, os.PathLike)):
        yield source
        return
    with open(source, "rb", opener=lambda path, flags: os.open(path, flags | os.O_NONBLOCK)) as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise BadImageError("not a regular file (a named pipe, socket or device): refused")
        yield file


def cannot_decode(error: Exception, source) -> BadImageError:
    """Pillow's reason, naming the file alone. It was opened here (regular_file), so Pillow names the file object."""
    if isinstance(error, Image.UnidentifiedImageError):
        named = f" {os.path.basename(source)!r}" if isinstance(source, (str, os.PathLike)) else ""
        return BadImageError(f"cannot decode image: cannot identify image file{named}")
    return BadImageError(f"cannot decode image: {without_folder(error, source)}")


def without_folder(error: Exception, source) -> str:
    """The error's message with the file's folder left out: users see their file's name, never a server path (an
    upload's lies in Gradio's temporary folder)."""
    message = str(error)
    if isinstance(source, (str, os.PathLike)):
        message = message.replace(os.fspath(source), os.path.basename(source))
    return message


def _check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadImageError(f"image too large ({width}x{height} > {max_pixels} pixels)")


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: transparency over `background`, 16-bit and float scaled, CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _high_bit_depth_to_l(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float greyscale image to 8 bits; PIL's own convert clips instead of scaling."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    else:
        # 16-bit PNGs arrive as mode I or I;16; their range is 0..65535
        scaled = values / 257.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
