"""What a captioner is asked for: plain settings, importable before torch (the command line's --help)."""

from dataclasses import dataclass

CAPTIONERS = ("blip", "florence2", "clip")
DEFAULT_MODELS = {  # the models the captioners were written against, by hub id
    "blip": "Salesforce/blip-image-captioning-large",  # the family that captioned pokemon-blip-captions
    "florence2": "florence-community/Florence-2-base",  # transformers' native port of microsoft/Florence-2-base
    "clip": "openai/clip-vit-large-patch14",  # Stable Diffusion v1's text encoder's CLIP
}
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
FORMATS = ("jsonl", "txt")


@dataclass(frozen=True)
class CaptionerSpec:
    """Which captioner to load and how it writes."""

    name: str  # one of CAPTIONERS
    model: str  # hub id or local folder
    device: str  # "cpu", "cuda", "cuda:1", "mps"
    candidates: tuple[str, ...] = ()  # clip: the captions it picks from
    prompt: str = ""  # blip: the text every caption starts with
    task: str = FLORENCE_TASKS[0]  # florence2
    max_new_tokens: int = 60
    num_beams: int = 3
