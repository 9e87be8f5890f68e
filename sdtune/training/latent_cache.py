"""--cache_latents: encode every training image and caption once, before training.

The cache holds the VAE's latent *distribution* (mean and std) of each image and of its mirror, not a sample, so the
training step still draws a fresh latent every time and trains on the same distribution as without the cache.
Each example's tensors are kept on their own: with --enable_bucket their shapes differ from bucket to bucket.
"""

from collections import defaultdict

import torch
from tqdm.auto import tqdm


class LatentCache:
    """Latent distributions by (example, flipped) and text embeddings by caption, kept in CPU memory."""

    def __init__(self, means, stds, text_embeddings: dict[str, torch.Tensor]):
        self.means, self.stds, self.text_embeddings = means, stds, text_embeddings  # means[example]: [flips, C, H, W]

    def image_distribution(self, position: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        index = 1 if flip else 0
        return self.means[position][index], self.stds[position][index]

    def text_embedding(self, caption: str) -> torch.Tensor:
        return self.text_embeddings[caption]

    def nbytes(self) -> int:
        tensors = [*self.means, *self.stds, *self.text_embeddings.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def build_latent_cache(dataset, vae, text_encoder, device, batch_size: int, show_progress: bool) -> LatentCache:
    """Encode the dataset's images (both orientations when it flips) and every caption it can draw."""
    flips = [False, True] if dataset.random_flip else [False]
    means, stds = [None] * len(dataset), [None] * len(dataset)
    # the positions of one row (kohya's repeats) share its centre-cropped pixels: encoded once, the tensors shared
    rows = getattr(dataset, "row_of", range(len(dataset)))
    first = {}
    for position, row in enumerate(rows):
        first.setdefault(row, position)
    distinct = sorted(first.values())
    for batch in tqdm(same_size_batches(dataset, batch_size, distinct), desc="caching latents",
                      disable=not show_progress):
        per_flip = [_encode_images(dataset, batch, flip, vae, device) for flip in flips]
        for index, position in enumerate(batch):
            means[position] = torch.stack([mean[index] for mean, _ in per_flip])
            stds[position] = torch.stack([std[index] for _, std in per_flip])
    for position, row in enumerate(rows):
        means[position], stds[position] = means[first[row]], stds[first[row]]
    text = _encode_captions(dataset, text_encoder, device, batch_size)
    return LatentCache(means, stds, text)


def same_size_batches(dataset, batch_size: int, positions=None) -> list[list[int]]:
    """The dataset's positions (or those given) in batches of at most `batch_size` whose examples share a size (a
    bucket)."""
    by_size = defaultdict(list)
    for position in range(len(dataset)) if positions is None else positions:
        by_size[dataset.target_size(position)].append(position)
    return [positions[start:start + batch_size] for positions in by_size.values()
            for start in range(0, len(positions), batch_size)]


def _encode_images(dataset, positions, flip: bool, vae, device):
    pixels = torch.stack([dataset.image_at(p, flip) for p in positions]).to(device, dtype=vae.dtype)
    distribution = vae.encode(pixels).latent_dist
    return distribution.mean.cpu(), distribution.std.cpu()


def _encode_captions(dataset, text_encoder, device, batch_size: int) -> dict[str, torch.Tensor]:
    captions = dataset.all_captions()
    embeddings = {}
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        input_ids = torch.stack([dataset.tokenize(c) for c in chunk]).to(device)
        hidden = text_encoder(input_ids, return_dict=False)[0].cpu()
        embeddings.update(zip(chunk, hidden))
    return embeddings
