"""The tiny world: a 1/1000-scale copy of fine-tuning Stable Diffusion on pokemon, trained and checked on a CPU.

Shapes (the base world) and cartoon creatures (tiny pokemon), a VAE and a CLIP trained on both, and a stock UNet
trained on shapes only. `python -m tinyworld.build` rebuilds the shipped models; see docs/tinyworld.md.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STOCK = REPO / "tinyworld" / "stock"  # the shipped StableDiffusionPipeline
CLIP = REPO / "tinyworld" / "clip"  # the shipped CLIPModel, tokenizer and image processor
