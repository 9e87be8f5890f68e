"""Serve the stock and fine-tuned models: text to image, image to image, random-model batch, and their API.

    python gradio_app.py                         # configs/models.yaml on http://127.0.0.1:7860
    python gradio_app.py --share --auth user:password
"""

from sdtune.app import main

if __name__ == "__main__":
    main()
