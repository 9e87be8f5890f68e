"""CMMD (Jayasumana et al., "Rethinking FID", CVPR 2024): the maximum mean discrepancy between the CLIP image
embeddings of generated and reference images under a Gaussian RBF kernel, with bootstrap intervals.

The estimate is the one of the paper's reference code (google-research/cmmd/distance.py): unit-length embeddings,
sigma 10, the biased estimator (the squared MMD between the two sets' empirical distributions: every pair counts,
a point with itself included), times 1000. Being a distance between two distributions, it is exactly 0 for
identical sets; the unbiased estimator is not (it is negative there).
"""

import numpy as np

from sdtune.errors import SdtuneError
from sdtune.evaluation.stats import percentile_interval

SIGMA = 10.0  # the paper's bandwidth, on unit-length embeddings (squared distances in [0, 4])
SCALE = 1000.0  # the paper's, to bring the values to a readable size
RESAMPLES = 10_000


def gaussian_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp(-|a_i - b_j|² / 2σ²) for every row i of a and row j of b."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.exp(-np.maximum(squared, 0.0) / (2 * SIGMA**2))  # rounding can leave a tiny negative distance


def cmmd(generated: np.ndarray, reference: np.ndarray) -> float:
    """SCALE × the biased estimate of MMD² between two sets of embeddings (one a row)."""
    within = gaussian_kernel(generated, generated).mean() + gaussian_kernel(reference, reference).mean()
    return SCALE * float(within - 2 * gaussian_kernel(generated, reference).mean())


def resample_counts(rng: np.random.Generator, size: int, resamples: int) -> np.ndarray:
    """How often each of `size` items is drawn in each of `resamples` draws of `size` with replacement."""
    picks = rng.integers(0, size, size=(resamples, size)) + size * np.arange(resamples)[:, None]
    return np.bincount(picks.ravel(), minlength=resamples * size).reshape(resamples, size).astype(np.float64)


def within_term(counts: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Mean kernel over the pairs of distinct draws of each resample (counts: resamples × items)."""
    # A resample repeats items; the biased form would count each repeat as a perfect match and sit above the
    # estimate by about (1 - mean kernel) / n. Leaving out each draw paired with itself makes the replicate's
    # expectation under resampling exactly the estimate, so the interval is centred on it.
    draws = counts.sum(1)
    pairs = ((counts @ kernel) * counts).sum(1) - counts @ np.diag(kernel)
    return pairs / (draws * (draws - 1))


def cross_term(counts_a: np.ndarray, kernel: np.ndarray, counts_b: np.ndarray) -> np.ndarray:
    return ((counts_a @ kernel) * counts_b).sum(1) / (counts_a.sum(1) * counts_b.sum(1))


def check_sizes(generated: dict[str, np.ndarray], reference: np.ndarray) -> None:
    sizes = {len(embeddings) for embeddings in generated.values()}
    if len(sizes) != 1:
        raise SdtuneError(f"CMMD: every model needs the same number of images, not {sorted(sizes)}.")
    if min(sizes) < 2 or len(reference) < 2:
        raise SdtuneError(f"CMMD needs at least 2 generated and 2 reference images, not {min(sizes)} and "
                          f"{len(reference)}.")


def compare_to_reference(generated: dict[str, np.ndarray], reference: np.ndarray, seed: int = 0,
                         resamples: int = RESAMPLES) -> dict[str, dict]:
    """Every model's CMMD to the reference with its 95% bootstrap interval, and (after the first model) the
    difference to the first with a paired bootstrap interval. Row i of every model's embeddings must come from the
    same prompt and seed."""
    check_sizes(generated, reference)
    rng = np.random.default_rng(seed)
    size = len(next(iter(generated.values())))
    # One draw of image indices and one of reference images, shared by every model: the models rendered the same
    # (prompt, seed) list and are measured against the same references, so resampling them jointly keeps what they
    # share out of the difference's interval (an unpaired bootstrap would count that spread twice).
    draws = Resamples(resample_counts(rng, size, resamples), resample_counts(rng, len(reference), resamples),
                      reference)
    results, first = {}, None
    for name, embeddings in generated.items():
        value, replicates = cmmd(embeddings, reference), draws.replicates(embeddings)
        results[name] = {"value": value, "ci95": list(percentile_interval(replicates)),
                         "generated_images": size, "reference_images": len(reference)}
        if first is None:
            first = (value, replicates)
        else:
            results[name]["difference_to_first"] = {"mean": value - first[0],
                                                    "ci95": list(percentile_interval(replicates - first[1]))}
    return results


class Resamples:
    """Bootstrap draws of the generated images and of the reference images, and CMMD replicates over them."""

    def __init__(self, counts: np.ndarray, reference_counts: np.ndarray, reference: np.ndarray):
        self.counts, self.reference_counts, self.reference = counts, reference_counts, reference
        self.reference_term = within_term(reference_counts, gaussian_kernel(reference, reference))

    def replicates(self, embeddings: np.ndarray) -> np.ndarray:
        """One CMMD a draw, for one model's embeddings (rows in the order the draws index)."""
        cross = cross_term(self.counts, gaussian_kernel(embeddings, self.reference), self.reference_counts)
        return SCALE * (within_term(self.counts, gaussian_kernel(embeddings, embeddings)) + self.reference_term
                        - 2 * cross)
