"""CMMD: the estimator against hand computations, and its bootstrap intervals."""

import math

import numpy as np
import pytest

from sdtune.errors import SdtuneError
from sdtune.evaluation.cmmd import cmmd, compare_to_reference, within_term


def test_cmmd_matches_a_hand_computation():
    # X = {(0,0), (6,8)}, Y = {(0,0)}; sigma 10, so k = exp(-|d|² / 200): k((0,0), (6,8)) = exp(-100/200) = e^-½.
    # mean k(X,X) = (1 + 1 + 2e^-½) / 4 = (1 + e^-½) / 2; mean k(Y,Y) = 1; mean k(X,Y) = (1 + e^-½) / 2
    # MMD² = (1 + e^-½)/2 + 1 - (1 + e^-½) = (1 - e^-½) / 2 = 0.196735; CMMD = 1000 × that = 196.735
    generated, reference = np.array([[0.0, 0.0], [6.0, 8.0]]), np.array([[0.0, 0.0]])
    assert cmmd(generated, reference) == pytest.approx(1000 * (1 - math.exp(-0.5)) / 2, rel=1e-12)
    assert cmmd(reference, generated) == pytest.approx(196.734670, abs=1e-6)


def test_identical_sets_score_zero():
    # The biased estimator is the MMD between the two empirical distributions: identical sets, identical
    # distributions, exactly 0 (the unbiased estimator would give a negative value here).
    embeddings = np.random.default_rng(0).normal(size=(5, 3))
    assert cmmd(embeddings, embeddings.copy()) == 0.0
    assert cmmd(embeddings, embeddings[::-1]) == pytest.approx(0.0, abs=1e-9)  # order does not matter
    assert cmmd(embeddings, embeddings + 0.5) > 0


def test_a_resample_counts_pairs_of_distinct_draws():
    kernel = np.array([[1.0, 0.25], [0.25, 1.0]])
    # each item drawn once: the one pair of distinct draws is (item 0, item 1)
    assert within_term(np.array([[1.0, 1.0]]), kernel) == [0.25]
    # item 0 drawn twice: the pair is item 0 with its repeat, a perfect match
    assert within_term(np.array([[2.0, 0.0]]), kernel) == [1.0]


def unit_rows(rng, rows: int, shift: float = 0.0) -> np.ndarray:
    vectors = rng.normal(size=(rows, 3)) + shift
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_bootstrap_interval_contains_the_estimate_and_repeats_for_a_seed():
    rng = np.random.default_rng(1)
    reference = unit_rows(rng, 30)
    models = {"near": unit_rows(rng, 12), "far": unit_rows(rng, 12, shift=1.5)}
    results = compare_to_reference(models, reference, seed=3, resamples=2000)
    for result in results.values():
        assert result["ci95"][0] <= result["value"] <= result["ci95"][1]
    assert results["far"]["value"] > results["near"]["value"]
    difference = results["far"]["difference_to_first"]
    assert difference["mean"] == pytest.approx(results["far"]["value"] - results["near"]["value"])
    assert 0 < difference["ci95"][0] <= difference["mean"] <= difference["ci95"][1]
    assert compare_to_reference(models, reference, seed=3, resamples=2000) == results
    assert compare_to_reference(models, reference, seed=4, resamples=2000)["far"]["ci95"] != results["far"]["ci95"]


def test_the_same_images_twice_differ_by_exactly_zero():
    # paired: both models' replicates use the same draws, so identical images give an interval of [0, 0]
    rng = np.random.default_rng(2)
    images, reference = unit_rows(rng, 8), unit_rows(rng, 10)
    results = compare_to_reference({"a": images, "b": images.copy()}, reference, resamples=500)
    assert results["b"]["difference_to_first"] == {"mean": 0.0, "ci95": [0.0, 0.0]}


def test_too_few_images_is_a_clear_error():
    rng = np.random.default_rng(3)
    with pytest.raises(SdtuneError, match="at least 2 generated and 2 reference"):
        compare_to_reference({"a": unit_rows(rng, 1)}, unit_rows(rng, 5))
