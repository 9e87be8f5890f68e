"""Serve the stock and fine-tuned models: text to image, image to image, random-model batch, and their API.

    python gradio_app.py                         # configs/models.yaml on http://127.0.0.1:7860
    python gradio_app.py --share --auth user:password
"""

from sdtune.app.flags import parse_app_args
from sdtune.errors import exit_on_error

if __name__ == "__main__":
    with exit_on_error():
        args = parse_app_args()
        from sdtune.app.launch import serve  # torch, diffusers and Gradio load only once the flags are good

        serve(args)
