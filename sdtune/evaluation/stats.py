"""Summaries of per-image scores: spread, and bootstrap intervals (paired over prompts for CLIP scores)."""

import numpy as np


def prompt_means(scores: dict[str, list[float]]) -> dict[str, float]:
    return {prompt: float(np.mean(values)) for prompt, values in scores.items()}


def paired_bootstrap(differences, seed: int = 0, resamples: int = 10_000, level: float = 0.95):
    """Mean of paired differences and its percentile bootstrap interval (resampling the pairs with replacement)."""
    return bootstrap_mean(differences, seed, resamples, level)


def bootstrap_mean(values, seed: int = 0, resamples: int = 10_000, level: float = 0.95):
    """Mean of `values` and its percentile bootstrap interval (resampling the values with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    return float(values.mean()), percentile_interval(means, level)


def percentile_interval(replicates, level: float = 0.95) -> tuple[float, float]:
    """The central `level` of bootstrap replicates: the percentile interval."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


def summarise(per_prompt: dict[str, list[float]]) -> dict:
    """Mean and std over all images, and the std of the per-prompt means (how much prompts differ)."""
    values = [v for scores in per_prompt.values() for v in scores]
    means = prompt_means(per_prompt)
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "prompt_means_std": float(np.std(list(means.values()), ddof=1)) if len(means) > 1 else 0.0,
        "per_prompt": means,
    }
