"""Slide-label probe (issue 4 item 3): pooling, AUROC semantics, grouped CV, undefined cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from hescape.errors import DataError
from hescape.evaluate.slide_probe import _splits, auroc_with_ci, pool_by_sample, slide_label_probe


def spots(sample_emb: np.ndarray, per_sample: int, rng, noise: float = 0.1):
    """Spot embeddings scattered around each sample's embedding; sample ids ``s00``, ``s01``, ..."""
    emb = np.repeat(sample_emb, per_sample, axis=0) + rng.normal(scale=noise, size=(len(sample_emb) * per_sample,
                                                                                    sample_emb.shape[1]))
    ids = np.repeat([f"s{i:02d}" for i in range(len(sample_emb))], per_sample)
    return emb, ids


def test_pool_by_sample_hand_case_keeps_first_appearance_order():
    emb = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    pooled, order = pool_by_sample(emb, ["b", "a", "b"])
    assert order.tolist() == ["b", "a"]
    np.testing.assert_array_equal(pooled, [[3.0, 4.0], [3.0, 4.0]])
    pooled, _ = pool_by_sample(emb, ["b", "a", "b"], how="max")
    np.testing.assert_array_equal(pooled, [[5.0, 6.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match="known: mean, max"):
        pool_by_sample(emb, ["b", "a", "b"], how="attention")


def test_auroc_hand_cases_with_ties_follow_roc_auc_score():
    # Negatives 0.1, 0.5; positives 0.5, 0.9. Pairs (neg, pos): (0.1, 0.5) 1, (0.1, 0.9) 1, (0.5, 0.5) 1/2,
    # (0.5, 0.9) 1: AUROC = 3.5 / 4.
    y, s = [0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]
    assert auroc_with_ci(y, s, n_bootstrap=0)["auroc"] == pytest.approx(0.875)
    assert roc_auc_score(y, s) == pytest.approx(0.875)
    # Negatives 0.3, 0.1; positives 0.3 (1/2, 1), 0.8 (1, 1), 0.2 (0, 1): 4.5 / 6.
    y, s = [0, 1, 0, 1, 1], [0.3, 0.3, 0.1, 0.8, 0.2]
    assert auroc_with_ci(y, s, n_bootstrap=0)["auroc"] == pytest.approx(0.75)
    # All scores tied: exactly chance.
    assert auroc_with_ci([0, 1, 0, 1], [0.5] * 4, n_bootstrap=0)["auroc"] == 0.5
    # Many ties on a larger random case: identical to sklearn.
    rng = np.random.default_rng(8)
    y, s = rng.integers(0, 2, 200), rng.integers(0, 5, 200) / 4
    assert auroc_with_ci(y, s, n_bootstrap=0)["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    s = y * 0.5 + rng.normal(size=60)
    a = auroc_with_ci(y, s, n_bootstrap=300, seed=1)
    assert a == auroc_with_ci(y, s, n_bootstrap=300, seed=1)
    assert a["ci_low"] <= a["auroc"] <= a["ci_high"] and a["n_bootstrap_used"] == 300
    assert a["ci_high"] - a["ci_low"] > 0.05


def test_perfectly_separable_samples_score_one():
    rng = np.random.default_rng(1)
    label = np.tile([0, 1], 10)
    sample_emb = rng.normal(size=(20, 8))
    sample_emb[:, 0] += 6.0 * label
    emb, ids = spots(sample_emb, 5, rng)
    out = slide_label_probe(emb, ids, np.repeat(label, 5), n_bootstrap=200)
    assert out["reason"] is None
    assert out["auroc"] == 1.0 and out["ci_low"] == pytest.approx(1.0) and out["ci_high"] == 1.0
    assert out["n_samples"] == 20 and out["n_positive"] == 10 and out["positive_class"] == 1
    assert out["cv"] == "stratified-5-fold" and out["n_folds"] == 5


def test_random_embeddings_score_near_chance_with_a_wide_interval():
    rng = np.random.default_rng(2)
    label = rng.permutation(np.repeat([0, 1], 40))
    emb, ids = spots(rng.normal(size=(80, 8)), 2, rng)
    out = slide_label_probe(emb, ids, np.repeat(label, 2), n_bootstrap=300)
    # Over 30 seeds this set-up gives AUROC 0.48 +- 0.09 (the folds' refits add to the 0.065 of a
    # fixed scorer), so 0.25 is a ~2.7 sd bound; the bootstrap over samples is about +-0.12.
    assert abs(out["auroc"] - 0.5) < 0.25
    assert out["ci_high"] - out["ci_low"] > 0.2
    assert out["ci_low"] <= out["auroc"] <= out["ci_high"]


def test_single_class_is_undefined_not_an_error():
    rng = np.random.default_rng(3)
    emb, ids = spots(rng.normal(size=(6, 4)), 3, rng)
    out = slide_label_probe(emb, ids, np.ones(18, dtype=int))
    assert np.isnan(out["auroc"]) and np.isnan(out["ci_low"]) and np.isnan(out["ci_high"])
    assert "only one class" in out["reason"]
    assert out["n_samples"] == 6 and out["n_classes"] == 1


def test_label_that_varies_within_a_sample_is_an_error_naming_it():
    rng = np.random.default_rng(4)
    emb, ids = spots(rng.normal(size=(4, 4)), 3, rng)
    labels = np.repeat([0, 1, 0, 1], 3)
    labels[7] = 1  # a spot of sample s02 disagrees
    with pytest.raises(ValueError, match="not constant within sample 's02'") as info:
        slide_label_probe(emb, ids, labels)
    assert isinstance(info.value, DataError)  # the CLI reports it as bad input (exit status 2)
    donors = np.repeat(["d0", "d0", "d1", "d1"], 3)
    donors[0] = "d9"
    with pytest.raises(ValueError, match="group is not constant within sample 's00'"):
        slide_label_probe(emb, ids, np.repeat([0, 1, 0, 1], 3), groups=donors)


def test_grouped_folds_never_split_a_donor():
    y = np.tile([0, 1], 12)
    for n_donors, expected in ((4, "leave-one-group-out"), (8, "stratified-group-5-fold")):
        groups = np.repeat([f"d{i}" for i in range(n_donors)], 24 // n_donors)
        folds, scheme = _splits(y, groups, 5, seed=0)
        assert scheme == expected
        assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(24))
        for train_idx, test_idx in folds:
            assert not set(groups[train_idx]) & set(groups[test_idx])
    # Few samples: fewer stratified folds, never leave-one-out (its pooled AUROC is biased low).
    few = np.array([0, 1, 0, 1, 0, 1])
    folds, scheme = _splits(few, None, 5, seed=0)
    assert scheme == "stratified-3-fold" and len(folds) == 3
    assert all(sorted(few[te].tolist()) == [0, 1] for _, te in folds)
    # Donors with one sample each: stratified group folds rather than leave-one-group-out.
    folds, scheme = _splits(np.array([0, 1, 0, 1]), np.array(["a", "b", "c", "d"]), 5, seed=0)
    assert scheme == "stratified-group-2-fold"
    folds, scheme = _splits(np.array([0, 1, 0, 0]), np.array(["a", "b", "c", "d"]), 5, seed=0)
    assert folds is None and "single sample" in scheme


def test_fold_without_a_class_in_training_is_undefined():
    rng = np.random.default_rng(6)
    # Donor d0 has both positive samples: the fold holding d0 out has no positive to learn from.
    label = np.array([1, 1, 0, 0, 0, 0])
    donors = np.array(["d0", "d0", "d1", "d1", "d2", "d2"])
    emb, ids = spots(rng.normal(size=(6, 4)), 3, rng)
    out = slide_label_probe(emb, ids, np.repeat(label, 3), groups=np.repeat(donors, 3), n_bootstrap=50)
    assert np.isnan(out["auroc"])
    assert "'d0'" in out["reason"] and "no training sample of class ['1']" in out["reason"]
    one_donor = slide_label_probe(emb, ids, np.repeat(label, 3), groups=np.repeat(["d0"] * 6, 3))
    assert np.isnan(one_donor["auroc"]) and "only one group" in one_donor["reason"]


def test_three_classes_use_macro_one_vs_rest():
    rng = np.random.default_rng(7)
    label = np.tile(["a", "b", "c"], 6)
    sample_emb = rng.normal(size=(18, 6))
    sample_emb[np.arange(18), np.searchsorted(["a", "b", "c"], label)] += 8.0
    emb, ids = spots(sample_emb, 3, rng)
    out = slide_label_probe(emb, ids, np.repeat(label, 3), n_bootstrap=50)
    assert out["n_classes"] == 3 and out["positive_class"] is None
    assert out["auroc"] == 1.0
