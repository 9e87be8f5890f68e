"""CLIP scores of generated images: torchmetrics' CLIP score per image, and CLIP similarities for image editing.

torchmetrics 1.9's CLIP score expects `get_image_features` / `get_text_features` to return tensors; transformers 5
returns a `BaseModelOutputWithPooling` (torchmetrics issue 3407, fixed on its main branch but not released). The
adapter below hands torchmetrics the projected embeddings, so its own definition of the score is still the one used.
"""

import numpy as np
import torch
from torchmetrics.functional.multimodal import clip_score
from transformers import CLIPModel, CLIPProcessor

from sdtune.errors import SdtuneError


def embedding_tensor(output) -> torch.Tensor:
    """The projected embeddings, whether transformers returned a tensor (v4) or a model output (v5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class FeatureTensors(torch.nn.Module):
    """A CLIPModel whose feature methods return tensors, as torchmetrics expects."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return embedding_tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return embedding_tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def image_tensor(image, device) -> torch.Tensor:
    """PIL image to the uint8 CHW tensor torchmetrics takes."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).to(device)


class ClipScorer:
    """One CLIP, loaded once, scoring any number of images."""

    def __init__(self, name_or_path: str, device="cpu", cache_dir=None):
        try:
            model = CLIPModel.from_pretrained(name_or_path, cache_dir=cache_dir, use_safetensors=True)
            self.processor = CLIPProcessor.from_pretrained(name_or_path, cache_dir=cache_dir)
        except (OSError, ValueError) as error:
            raise SdtuneError(f"Cannot load CLIP '{name_or_path}': {error}\n"
                              "Give a hub id you can reach or a local CLIPModel folder "
                              "(--clip_model_name_or_path).") from error
        self.device = torch.device(device)
        self.model = FeatureTensors(model.eval().to(self.device))

    @torch.no_grad()
    def score(self, image, prompt: str) -> float:
        """torchmetrics' CLIP score of one image and its prompt: 100 * max(cos, 0)."""
        value = clip_score(image_tensor(image, self.device), prompt,
                           model_name_or_path=lambda: (self.model, self.processor))
        return float(value)

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        pixels = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        return torch.nn.functional.normalize(self.model.get_image_features(pixels.to(self.device)), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        features = self.model.get_text_features(tokens["input_ids"].to(self.device),
                                                tokens["attention_mask"].to(self.device))
        return torch.nn.functional.normalize(features, dim=-1)

    def edit_similarities(self, before, after, source_caption: str, edit_prompt: str) -> dict[str, float]:
        """CLIP directional similarity (image change vs caption change) and image preservation (input vs output)."""
        images = self.image_embeddings([before, after])
        texts = self.text_embeddings([source_caption, edit_prompt])
        image_change, text_change = images[1] - images[0], texts[1] - texts[0]
        directional = torch.nn.functional.cosine_similarity(image_change, text_change, dim=0)
        return {"directional_similarity": float(directional), "preservation": float(images[0] @ images[1])}
