"""Captions for a folder of pictures: `python -m sdtune.caption DIR` (cli), the captioners (BLIP, Florence-2, CLIP
ranking), and the caption files they write (metadata.jsonl or kohya's .txt)."""
