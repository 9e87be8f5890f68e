import io
import os

import numpy as np
import pytest
from helpers import png_header_only, within
from PIL import Image

from sdtune.data.images import MAX_IMAGE_PIXELS, BadImageError, header_size, open_image, to_rgb


def png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=params.pop("format", "PNG"), **params)
    return buffer.getvalue()


def test_transparent_pixels_become_the_background_not_black():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (0, 0, 255)


def test_palette_with_transparency_is_composited():
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.info["transparency"] = 0
    palette.putpixel((1, 1), 1)
    rgb = to_rgb(palette)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 1)) == (200, 10, 10)


def test_16_bit_greyscale_is_scaled_not_clipped():
    # PIL's own convert("RGB") clips 16-bit values at 255: mid-grey would come out white.
    values = np.array([[0, 32896], [65535, 257 * 10]], dtype=np.uint16)
    image = open_image(png_bytes(Image.fromarray(values)))
    rgb = np.asarray(to_rgb(image))
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[0, 1].tolist() == [128, 128, 128]
    assert rgb[1, 0].tolist() == [255, 255, 255]
    assert rgb[1, 1].tolist() == [10, 10, 10]


def test_cmyk_converts_to_rgb():
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    red, green, blue = to_rgb(open_image(png_bytes(cmyk, format="JPEG", quality=100))).getpixel((1, 1))
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (40, 10), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = open_image(png_bytes(wide, format="JPEG", exif=exif.tobytes()))
    assert image.size == (10, 40)


@pytest.mark.parametrize("payload, reason", [
    (b"", "0 bytes"),
    (b"\x89PNG\r\n\x1a\n not really a png", "cannot decode"),
    (b"plain text, not an image", "cannot decode"),
])
def test_bad_payloads_raise_a_clear_error(payload, reason):
    with pytest.raises(BadImageError, match=reason):
        open_image(payload)


def test_truncated_file_fails_at_open_not_later():
    data = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(BadImageError):
        open_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr("sdtune.data.images.MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadImageError, match="too large"):
        open_image(png_bytes(Image.new("RGB", (20, 20))))


def test_a_named_pipe_is_refused_not_waited_on(tmp_path):
    # opening a pipe for reading waits for a writer: the batch CLI, metrics.py and the app's folder batch hung on one
    pipe = tmp_path / "fifo.png"
    os.mkfifo(pipe)
    for read in (open_image, lambda path: header_size(path, MAX_IMAGE_PIXELS)):
        with pytest.raises(BadImageError, match="not a regular file"):
            within(10, read, pipe)


def test_an_image_beyond_pillows_own_limit_is_refused_in_this_projects_words(tmp_path):
    huge = png_header_only(tmp_path / "huge.png", 30000, 30000)  # 900 megapixels: Pillow refuses it as it opens
    for read in (open_image, lambda path: header_size(path, 4096 * 4096)):
        with pytest.raises(BadImageError) as error:
            read(huge)
        assert "image too large (more than" in str(error.value) and "DOS" not in str(error.value)
    with pytest.raises(BadImageError, match=r"image too large \(13000x13000 > 16777216 pixels\)"):
        header_size(png_header_only(tmp_path / "big.png", 13000, 13000), 4096 * 4096)
