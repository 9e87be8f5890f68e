"""metrics.py --subject_images: subject fidelity as the DreamBooth paper measures it (Ruiz et al. 2023, section 4.1).

CLIP-I: the cosine similarity between the CLIP image embeddings of a generated image and of each real picture of the
subject, averaged. DINO: the same with a self-supervised ViT's embeddings (DINO ViT-S/16, its CLS token, as the
paper), which are trained to tell apart images of one class, so they reward the subject's own look more than its
kind's. Each generated image gets its mean similarity to the subject's pictures; a model's score is the mean over its
images, with a bootstrap interval over them, and its difference to the first model is paired, image by image, since
every model renders the same (prompt, seed) pairs.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel

from sdtune.errors import SdtuneError
from sdtune.evaluation.reference import decode_or_skip, embed_images, list_reference
from sdtune.evaluation.stats import bootstrap_mean, paired_bootstrap

FLAG = "--subject_images"
NO_DINO = "none"  # --dino_model_name_or_path none: CLIP-I only


class DinoEmbedder:
    """A self-supervised ViT (DINO, DINOv2 or any transformers image backbone with a CLS token), loaded once."""

    def __init__(self, name_or_path: str, device="cpu", cache_dir=None):
        try:
            self.processor = AutoImageProcessor.from_pretrained(name_or_path, cache_dir=cache_dir)
            model = AutoModel.from_pretrained(name_or_path, cache_dir=cache_dir)
        except (OSError, ValueError) as error:
            raise SdtuneError(f"Cannot load the DINO model '{name_or_path}': {error}\nGive a hub id you can reach or "
                              "a local ViT folder (--dino_model_name_or_path), or --dino_model_name_or_path none "
                              "for CLIP-I alone.") from error
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """Unit-length CLS embeddings of the last layer, one row an image."""
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        hidden = self.model(pixel_values=pixels["pixel_values"].to(self.device)).last_hidden_state
        return torch.nn.functional.normalize(hidden[:, 0].float(), dim=-1)


@dataclass
class SubjectSet:
    """The real pictures of the subject, embedded by each metric's model."""

    folder: str
    count: int
    skipped: list[str]  # names of the files that could not be read
    images: list  # the decoded pictures, until embed_subject (a subject is a handful of pictures)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # metric ("clip_i", "dino") -> unit rows


def read_subject(folder: str) -> SubjectSet:
    """List and decode the folder's images (before any model loads); unreadable files are skipped and named."""
    listed = list_reference(folder, FLAG)
    skipped = []
    images = [image for image in (decode_or_skip(item, skipped) for item in listed.listed) if image is not None]
    if not images:
        raise SdtuneError(f"{FLAG} {folder}: none of its {len(listed.listed)} image files could be read.")
    return SubjectSet(folder, len(images), skipped, images)


def embed_subject(subject: SubjectSet, embedders: dict) -> SubjectSet:
    """Each metric's embeddings of the subject's pictures; `embedders`: metric name -> model with image_embeddings."""
    subject.embeddings = {name: embed_images(model, subject.images) for name, model in embedders.items()}
    subject.images = []
    return subject


def fidelity(generated: np.ndarray, subject: np.ndarray) -> np.ndarray:
    """Per generated image (unit rows), its mean cosine similarity to the subject's pictures (unit rows)."""
    return (generated @ subject.T).mean(axis=1)


def add_subject_fidelity(results: dict, grids: dict, subject: SubjectSet, embedders: dict, seed: int) -> None:
    """Each model's CLIP-I (and DINO) on the images it rendered for its CLIP scores: a column per metric in its
    per-image rows, and `subject` in its results with the mean, interval and paired difference to the first model."""
    baseline = {}
    for name, result in results.items():
        # grids hold the images in the rows' (prompt, seed) order, which the pairing relies on
        images = [image for row in grids[name].values() for image in row]
        result["subject"] = {"subject_images": subject.count, "subject_skipped": subject.skipped,
                             "folder": subject.folder}
        for metric, model in embedders.items():
            scores = fidelity(embed_images(model, images), subject.embeddings[metric])
            for row, score in zip(result["per_image"], scores):
                row[metric] = float(score)
            result["subject"][metric] = metric_summary(scores, baseline.get(metric), seed)
            baseline.setdefault(metric, scores)


def metric_summary(scores: np.ndarray, baseline: np.ndarray | None, seed: int) -> dict:
    mean, interval = bootstrap_mean(scores, seed=seed)
    summary = {"mean": mean, "ci95": list(interval)}
    if baseline is not None:
        difference, difference_interval = paired_bootstrap(scores - baseline, seed=seed)
        summary["difference_to_first"] = {"mean": difference, "ci95": list(difference_interval)}
    return summary
