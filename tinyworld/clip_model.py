"""The tiny world's CLIP: text and vision towers trained contrastively on both sets.

Its text tower is also the stock pipeline's text encoder, as OpenAI's CLIP ViT-L/14 text tower is Stable Diffusion's.
Backgrounds are swapped at random (and the caption's background word with them): like a real CLIP, which has seen
everything, it knows every (species, background) pair, so it can judge the fine-tune on the pairs that the fine-tune
never saw. Without the swap it mistook yellow creatures on white, a pair it had not seen, for orange ones.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
)

from tinyworld.factories import text_config
from tinyworld.training import (
    WARMUP_STEPS,
    StepLog,
    balanced_batch,
    random_flip,
    seeded,
    swap_background,
    with_background,
)

IMAGE_SIZE = 64
MAX_TOKENS = 32  # the longest caption is 16 tokens with its start and end; prompts beyond 32 are truncated
# OpenAI CLIP's normalisation, so that the saved CLIPImageProcessor is the usual one at 64 px
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(tokenizer: CLIPTokenizer) -> CLIPModel:
    """A 3-layer text tower (width 64, also the UNet's cross-attention width) and a 4-layer ViT on 8 px patches."""
    text = text_config(tokenizer, hidden_size=64, num_hidden_layers=3, intermediate_size=256)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=96, intermediate_size=384,
                              num_hidden_layers=4, num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64))


def image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                              image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, 64, 64] as the CLIPImageProcessor above prepares them (64 px needs no resize or crop)."""
    mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
    return (pixels.float() / 255.0 - mean) / std


def features(output) -> torch.Tensor:
    """The projected embedding: transformers 5 returns a model output whose pooler_output holds it, 4 a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def embed_text(clip: CLIPModel, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    return F.normalize(features(clip.get_text_features(**tokens)), dim=-1)


def embed_images(clip: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    return F.normalize(features(clip.get_image_features(pixel_values=pixel_values)), dim=-1)


def contrastive_loss(clip, tokenizer, pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, over the batch's distinct captions: images sharing a caption are all its
    positives, never each other's negatives."""
    distinct = sorted(set(captions))
    labels = torch.tensor([distinct.index(c) for c in captions])
    logits = clip.logit_scale.exp() * embed_images(clip, normalise(pixels)) @ embed_text(clip, tokenizer, distinct).T
    positives = F.one_hot(labels, len(distinct)).float().T
    text_to_image = -(positives / positives.sum(1, keepdim=True) * logits.T.log_softmax(dim=1)).sum(1).mean()
    return (F.cross_entropy(logits, labels) + text_to_image) / 2


def train_clip(tokenizer, sets: list, steps: int, batch_size: int = 128, learning_rate: float = 1e-3,
               seed: int = 0) -> CLIPModel:
    """Train from scratch on (uint8 pixels, captions) sets, drawn equally into every batch."""
    clip = seeded(lambda: build_clip(tokenizer), seed)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=learning_rate, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, WARMUP_STEPS, steps)
    generator, log = torch.Generator().manual_seed(seed), StepLog("clip")
    for step in range(steps):
        pixels, captions = balanced_batch(sets, batch_size, generator)
        pixels, backgrounds = swap_background(pixels, generator)
        captions = [with_background(c, b) for c, b in zip(captions, backgrounds)]
        loss = contrastive_loss(clip, tokenizer, random_flip(pixels, generator), captions)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            clip.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: a temperature of 1/100
        log(step, loss.item())
    return clip.eval()


def save_clip(clip: CLIPModel, tokenizer: CLIPTokenizer, folder) -> Path:
    """CLIPModel, tokenizer and image processor in one folder: CLIPModel and CLIPProcessor.from_pretrained load it."""
    clip.save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(folder)
    return Path(folder)


def text_encoder_of(clip: CLIPModel) -> CLIPTextModel:
    """The text tower alone, as Stable Diffusion's pipeline loads it (its last hidden states condition the UNet)."""
    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())  # transformers 5: the same class inside CLIPModel
    return encoder.eval()


@torch.no_grad()
def ranking_accuracy(clip: CLIPModel, tokenizer: CLIPTokenizer, pixels: torch.Tensor, captions: list[str],
                     candidates: list[str]) -> float:
    """Share of images whose own caption is the most similar of `candidates` (which must include it)."""
    text = embed_text(clip, tokenizer, candidates)
    image = torch.cat([embed_images(clip, normalise(chunk)) for chunk in pixels.split(256)])
    best = (image @ text.T).argmax(dim=1)
    truth = torch.tensor([candidates.index(c) for c in captions])
    return (best == truth).float().mean().item()
