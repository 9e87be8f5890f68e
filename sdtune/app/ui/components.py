"""Gradio components of this app's own: inputs that refuse, before Gradio's own preprocessing acts on them, what it
would silently change or decode.

Gradio writes a typing stub (components.pyi) beside any module that defines a component class; it is kept out of git
(.gitignore), and these classes are kept in this module alone so that the stub copies nothing else.
"""

import base64
import binascii
import io
from pathlib import Path

import gradio as gr
from gradio import processing_utils

from sdtune.data.images import BadImageError, header_size


class UploadedImage(gr.Image):
    """An image input that hands its handler the uploaded file itself, undecoded, for the service to decode with its
    own limits. Gradio's gr.Image opens every upload with Pillow first (whose errors name the file in the server's
    upload folder), and decodes a `data:` URL whole and re-saves it, before any check of its size: a 13000x13000 PNG
    of 490 KB took 1.3 GB. Here a data: URL's size is read from its header and an image over `max_pixels` refused
    before anything is decoded; the bytes of one within it are kept as a file, as an upload would be."""

    is_template = True  # the browser shows it as the gr.Image it is (Block.get_block_name)

    def __init__(self, *args, max_pixels: int, **kwargs):
        super().__init__(*args, type="filepath", image_mode=None, **kwargs)
        self.max_pixels = max_pixels

    def get_config(self, cls=None):
        # Gradio reads a component's properties from its class's __init__ signature: this one's (*args, max_pixels,
        # **kwargs) would send the browser none of gr.Image's, and the tab holding it would show nothing
        return super().get_config(cls or gr.Image)

    def preprocess(self, payload) -> str | None:
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):
            return self.kept_data_url(payload.url)
        return self.uploaded(payload.path)

    def uploaded(self, path: str | None) -> str:
        """`path` if it lies in Gradio's upload folder. Gradio 6.31 confines a file to it only when the request marks
        it as a file ("meta": {"_type": "gradio.FileData"}); an image sent as {"path": "/any/file.png"} reaches
        preprocess as it is, and gr.Image would open any image on the server."""
        if not path or not Path(path).resolve().is_relative_to(Path(self.GRADIO_CACHE).resolve()):
            raise gr.Error("Input image: not a file uploaded to this server; upload the image.")
        return path

    def kept_data_url(self, url: str) -> str:
        try:
            data = base64.b64decode(url.partition(",")[2])
            header_size(io.BytesIO(data), self.max_pixels)
        except binascii.Error as error:
            raise gr.Error(f"Input image: the data: URL is not base64 ({error}).") from error
        except BadImageError as error:
            raise gr.Error(f"Input image: {error}") from error
        return processing_utils.save_bytes_to_cache(data, "image.png", self.GRADIO_CACHE)
