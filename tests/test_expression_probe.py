"""Expression prediction probe (issue 4 item 2): ridge closed form, HVGs on train only, Pearson r, NaN genes."""

from __future__ import annotations

import numpy as np
import pytest

from hescape.evaluate.expression_probe import (
    expression_probe,
    grouped_expression_probe,
    log1p_normalised,
    median_total,
    pearson_per_column,
    ridge_alpha,
    select_hvg,
)


def poisson_counts(rng, n_spots: int, n_genes: int) -> np.ndarray:
    """Counts whose rates vary per spot and per gene, so every gene varies."""
    rates = rng.lognormal(mean=1.0, sigma=0.8, size=(1, n_genes)) * rng.lognormal(0.0, 0.6, size=(n_spots, n_genes))
    return rng.poisson(rates).astype(np.int64)


def test_ridge_matches_the_hand_computed_closed_form():
    # 3 training spots, 2 features, 2 genes; alpha = 100 / (2 x 2) = 25.
    # X^T X + 25 I = [[27, 1], [1, 27]], whose inverse is [[27, -1], [-1, 27]] / 728.
    # Gene a: y = [1, 2, 3], X^T y = [4, 5]  -> w = [27*4 - 5, -4 + 27*5] / 728 = [103, 131] / 728.
    # Gene b: y = [0, 1, 0], X^T y = [0, 1]  -> w = [-1, 27] / 728.
    X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0]])
    counts = np.expm1(y)  # target_sum=None gives log1p(counts) = y
    test_X = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    test_counts = np.expm1(np.array([[0.5, 0.1], [1.0, 0.7], [2.0, 0.3]]))
    out = expression_probe(X, counts, test_X, test_counts, hvg_idx=[0, 1], target_sum=None, genes=["a", "b"],
                           standardize=False, pca_dim=None, return_predictions=True)
    assert out["alpha"] == 25.0 and out["dim"] == 2
    W = np.array([[103.0, -1.0], [131.0, 27.0]]) / 728.0
    np.testing.assert_allclose(out["predictions"], test_X @ W, rtol=1e-5)
    closed = test_X @ np.linalg.solve(X.T @ X + 25.0 * np.eye(2), X.T @ y)
    np.testing.assert_allclose(out["predictions"], closed, rtol=1e-5)


def test_standardised_features_are_the_closed_form_on_train_scaled_features():
    rng = np.random.default_rng(0)
    Xtr, Xte = rng.normal(2.0, 3.0, size=(40, 5)), rng.normal(2.0, 3.0, size=(10, 5))
    ctr, cte = poisson_counts(rng, 40, 8), poisson_counts(rng, 10, 8)
    ts = median_total(ctr)
    out = expression_probe(Xtr, ctr, Xte, cte, hvg_idx=[1, 4, 6], target_sum=ts, return_predictions=True)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    Ztr, Zte = (Xtr - mu) / sd, (Xte - mu) / sd
    y = log1p_normalised(ctr, ts)[:, [1, 4, 6]].astype(np.float64)
    alpha = ridge_alpha(5, 3)
    expected = Zte @ np.linalg.solve(Ztr.T @ Ztr + alpha * np.eye(5), Ztr.T @ y)
    np.testing.assert_allclose(out["predictions"], expected, rtol=1e-6, atol=1e-9)
    assert set(out["pearson"]) == {"gene_1", "gene_4", "gene_6"}


def test_perfect_linear_features_give_r_near_one():
    rng = np.random.default_rng(1)
    ctr, cte = poisson_counts(rng, 300, 60), poisson_counts(rng, 200, 60)
    ts = median_total(ctr)
    hvg = select_hvg(ctr, n_top=50)
    assert len(hvg) == 50
    A = rng.normal(size=(50, 64))  # full row rank: targets are an exact linear function of the features
    Xtr = log1p_normalised(ctr, ts)[:, hvg] @ A
    Xte = log1p_normalised(cte, ts)[:, hvg] @ A
    out = expression_probe(Xtr, ctr, Xte, cte, hvg_idx=hvg, target_sum=ts)
    assert out["n_genes"] == 50 and out["n_nan"] == 0
    assert out["mean"] > 0.99
    assert min(out["pearson"].values()) > 0.98


def test_random_features_give_r_near_zero():
    rng = np.random.default_rng(2)
    ctr, cte = poisson_counts(rng, 400, 60), poisson_counts(rng, 400, 60)
    hvg = select_hvg(ctr, n_top=50)
    out = expression_probe(rng.normal(size=(400, 32)), ctr, rng.normal(size=(400, 32)), cte,
                           hvg_idx=hvg, target_sum=median_total(ctr))
    assert abs(out["mean"]) < 0.05  # per-gene sd ~ 0.05, mean of 50 genes ~ 0.007
    assert max(abs(v) for v in out["pearson"].values()) < 0.25


def test_constant_features_score_zero_not_nan():
    rng = np.random.default_rng(3)
    ctr, cte = poisson_counts(rng, 50, 10), poisson_counts(rng, 30, 10)
    out = expression_probe(np.ones((50, 4)), ctr, np.ones((30, 4)), cte, hvg_idx=range(10), target_sum=100.0)
    assert out["n_nan"] == 0
    assert out["mean"] == 0.0 and all(v == 0.0 for v in out["pearson"].values())


def test_gene_constant_on_test_spots_is_nan_and_left_out_of_the_mean():
    rng = np.random.default_rng(4)
    ctr, cte = poisson_counts(rng, 100, 6), poisson_counts(rng, 50, 6)
    cte[:, 2] = 0  # gene_2 is never seen in the test spots: its r is undefined
    X = rng.normal(size=(150, 8))
    out = expression_probe(X[:100], ctr, X[100:], cte, hvg_idx=range(6), target_sum=50.0)
    assert np.isnan(out["pearson"]["gene_2"])
    assert out["n_nan"] == 1 and out["nan_genes"] == ["gene_2"]
    others = [v for g, v in out["pearson"].items() if g != "gene_2"]
    assert out["mean"] == pytest.approx(np.mean(others))
    assert out["std"] == pytest.approx(np.std(others))


def test_pearson_per_column_hand_case():
    t = np.array([[1.0, 2.0, 5.0], [2.0, 2.0, 5.0], [3.0, 2.0, 5.0]])
    p = np.array([[2.0, 1.0, 7.0], [4.0, 0.0, 7.0], [6.5, 3.0, 7.0]])
    r = pearson_per_column(t, p)
    # Column 0: t centred (-1, 0, 1), p centred (-2.1667, -0.1667, 2.3333): r = 4.5 / (sqrt 2 sqrt 10.1667).
    assert r[0] == pytest.approx(4.5 / (np.sqrt(2) * np.sqrt(10.166666666666666)))
    assert np.isnan(r[1])  # constant target
    assert np.isnan(r[2])  # constant target (constant prediction too)
    assert pearson_per_column(t[:, :1], np.full((3, 1), 2.0))[0] == 0.0  # constant prediction only


def test_hvg_are_chosen_on_training_spots_only():
    rng = np.random.default_rng(5)
    train, test = poisson_counts(rng, 200, 30), poisson_counts(rng, 200, 30)
    train[:, 5] = 0  # never seen on training spots ...
    test[:, 5] = rng.poisson(rng.lognormal(3.0, 2.0, size=200))  # ... wildly variable on test spots
    assert 5 not in select_hvg(train, n_top=10)
    # The same call on training + test spots would choose it: the test above is not vacuous.
    assert 5 in select_hvg(np.vstack([train, test]), n_top=10)


def test_hvg_are_deterministic_with_exactly_n_top_under_ties():
    rng = np.random.default_rng(6)
    base = poisson_counts(rng, 120, 20)
    counts = np.hstack([base, base[:, [4]]])  # gene 20 is a copy of gene 4: their scores tie
    for n in range(1, 21):
        chosen = select_hvg(counts, n_top=n)
        assert len(chosen) == n
        if 4 in chosen or 20 in chosen:
            break
    assert 4 in chosen and 20 not in chosen  # the cut falls inside the tie: exactly n, lower index first
    assert select_hvg(counts, n_top=n + 1) == sorted([*chosen, 20])
    assert select_hvg(counts.copy(), n_top=n) == chosen
    assert len(select_hvg(counts, n_top=50)) == 21  # fewer genes than asked: every variable gene
    # Identical pairs leave mean bins without spread (no finite normalised dispersion, where scanpy's
    # own n_top_genes path fails); still exactly n_top genes, and a twin is never chosen before its pair.
    pairs = np.repeat(base[:, :6], 2, axis=1)
    chosen = select_hvg(pairs, n_top=3)
    assert len(chosen) == 3 and all(i % 2 == 0 or i - 1 in chosen for i in chosen)


def test_hvg_never_choose_genes_without_counts():
    rng = np.random.default_rng(7)
    counts = poisson_counts(rng, 60, 5)
    counts[:, 1] = 0
    counts[:, 4] = 0
    assert select_hvg(counts, n_top=5) == [0, 2, 3]


def test_donor_on_both_sides_is_an_error():
    rng = np.random.default_rng(8)
    c = poisson_counts(rng, 20, 4)
    X = rng.normal(size=(20, 3))
    with pytest.raises(ValueError, match="both training and test"):
        expression_probe(X[:10], c[:10], X[10:], c[10:], hvg_idx=[0, 1], target_sum=10.0,
                         groups_train=["d1"] * 5 + ["d2"] * 5, groups_test=["d2"] * 10)


def test_wide_features_are_reduced_to_pca_dim():
    rng = np.random.default_rng(9)
    c = poisson_counts(rng, 80, 6)
    X = rng.normal(size=(80, 40))
    out = expression_probe(X[:60], c[:60], X[60:], c[60:], hvg_idx=range(6), target_sum=20.0, pca_dim=16)
    assert out["dim"] == 16 and out["alpha"] == pytest.approx(100 / (16 * 6))
    assert expression_probe(X[:60], c[:60], X[60:], c[60:], hvg_idx=range(6), target_sum=20.0)["dim"] == 40


def grouped_data(rng, n_donors: int, per_donor: int = 60, n_genes: int = 30):
    counts = poisson_counts(rng, n_donors * per_donor, n_genes)
    groups = np.repeat([f"donor{i}" for i in range(n_donors)], per_donor)
    X = log1p_normalised(counts, median_total(counts)) @ rng.normal(size=(n_genes, 40))
    return X, counts, groups


def test_grouped_probe_leaves_each_donor_out_and_picks_genes_per_fold():
    rng = np.random.default_rng(10)
    X, counts, groups = grouped_data(rng, 3)
    # gene_7 varies only on donor2: a fold that holds donor2 out must not choose it.
    counts[:, 7] = 5
    counts[groups == "donor2", 7] = rng.poisson(rng.lognormal(3.0, 2.0, size=60))
    out = grouped_expression_probe(X, counts, groups, n_top=10)
    assert out["scheme"] == "leave-one-group-out" and out["n_folds"] == 3
    by_test = {tuple(f["test_groups"]): f for f in out["folds"]}
    assert set(by_test) == {("donor0",), ("donor1",), ("donor2",)}
    assert "gene_7" not in by_test[("donor2",)]["genes"]
    assert "gene_7" in by_test[("donor0",)]["genes"]
    assert all(f["n_train"] == 120 and f["n_test"] == 60 for f in out["folds"])
    means = [f["mean"] for f in out["folds"]]
    assert out["mean"] == pytest.approx(np.mean(means)) and out["std"] == pytest.approx(np.std(means))
    assert out["mean"] > 0.8  # features are (nearly) linear in every fold's targets


def test_grouped_probe_uses_group_k_fold_with_many_donors_and_honours_train_mask():
    rng = np.random.default_rng(11)
    X, counts, groups = grouped_data(rng, 7, per_donor=20, n_genes=12)
    out = grouped_expression_probe(X, counts, groups, n_top=5, n_splits=5)
    assert out["scheme"] == "group-k-fold" and out["n_folds"] == 5
    assert sorted(g for f in out["folds"] for g in f["test_groups"]) == sorted(set(groups))
    mask = groups != "donor6"
    masked = grouped_expression_probe(X, counts, groups, train_mask=mask, n_top=5, n_splits=10)
    assert masked["scheme"] == "leave-one-group-out" and masked["n_folds"] == 7
    for f in masked["folds"]:
        expected = 6 * 20 - (0 if f["test_groups"] == ["donor6"] else 20)
        assert f["n_train"] == expected


def test_grouped_probe_needs_two_groups():
    rng = np.random.default_rng(12)
    X, counts, groups = grouped_data(rng, 1, per_donor=10, n_genes=6)
    with pytest.raises(ValueError, match="at least 2 groups"):
        grouped_expression_probe(X, counts, groups)
