"""Gene-expression prediction probe (HEST-Benchmark protocol), as pure functions on arrays.

The question it answers: how much of a spot's expression can a linear model read from its image
embedding? Run it on the image trunk features before alignment and on the aligned image embeddings
of the same spots; the difference says whether contrastive alignment helped or hurt.

Protocol, checked against HEST-Benchmark (``mahmoodlab/HEST``: ``src/hest/bench/benchmark.py``,
``trainer.py``, ``bench_config/bench_config.yaml``) and noted where it differs:

- Targets: the 50 most variable genes, chosen on the TRAINING spots only (:func:`select_hvg`:
  scanpy's ``flavor="seurat"`` on log1p data, which is what HEST's gene-list script runs), as
  ``log1p(counts / spot_total * target_sum)`` with ``target_sum`` the training median spot total
  (:func:`hescape.data.gene_transforms.library_size_log1p`). HEST's targets are ``log1p`` of the raw
  counts without library-size scaling; ``target_sum=None`` reproduces that exactly.
- Features: standardised with a ``StandardScaler`` fitted on the training spots, then reduced to
  256 principal components fitted on the training spots when wider (HEST's default ``dimreduce:
  PCA``, ``latent_dim: 256``). Narrower features keep every dimension: ridge with one penalty on
  every coefficient is rotation-invariant, so a full-rank PCA would change nothing.
- Model: ``Ridge(fit_intercept=False, alpha=100 / (dim x n_genes))`` with ``dim`` the feature width
  the ridge sees, fitted on training donors and scored on test donors. HEST solves it with ``lsqr``;
  here sklearn's default solver gives the closed form ``(X^T X + alpha I)^-1 X^T Y``, the same
  objective without lsqr's stopping tolerance.
- Score: Pearson r per gene on the test spots; mean and (population) std over genes, like HEST.
  A gene whose test targets are constant has no defined r: it is NaN, left out of the mean and std,
  and counted in ``n_nan`` (HEST would let one NaN make the mean NaN). Constant predictions for a
  varying gene score r = 0: such a model carries no information, and dropping the gene would flatter it.
- Grouped folds (:func:`grouped_expression_probe`): when a panel has few donors, every donor (or a
  group of donors) is held out in turn; genes, ``target_sum``, scaler and PCA are refitted on each
  fold's training part; the score is the mean and std over folds of the per-fold mean r, as HEST's
  ``merge_fold_results`` does.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from hescape.data.gene_transforms import library_size_log1p

#: Genes predicted by the probe (HEST: ``var_50genes.json``).
N_TOP_GENES = 50
#: Principal components kept for features wider than this (HEST's ``latent_dim``).
PCA_DIM = 256
#: Folds of :func:`grouped_expression_probe` when there are more groups than this; fewer groups are
#: each held out in turn (leave-one-group-out).
N_SPLITS = 5


def ridge_alpha(dim: int, n_genes: int) -> float:
    """HEST's ridge penalty ``100 / (dim x n_genes)``."""
    return 100.0 / (dim * n_genes)


def log1p_normalised(counts, target_sum: float | None) -> np.ndarray:
    """Probe targets from raw counts: ``log1p(counts / spot_total * target_sum)``, float32.

    Parameters
    ----------
    counts
        ``(n_spots, n_genes)`` raw counts.
    target_sum
        Fixed total every spot is scaled to (the training median spot total), so a spot's target does
        not depend on the other spots; ``None`` gives ``log1p(counts)`` (HEST's targets).
    """
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be 2-D (spots, genes), got shape {counts.shape}")
    if target_sum is None:
        return np.log1p(counts.astype(np.float64)).astype(np.float32)
    return library_size_log1p(counts, target_sum)


def median_total(counts) -> float:
    """Median total counts over spots with any counts (the ``target_sum`` of the training split)."""
    totals = np.asarray(counts, dtype=np.float64).sum(1)
    totals = totals[totals > 0]
    if totals.size == 0:
        raise ValueError("every spot has zero counts")
    return float(np.median(totals))


def select_hvg(train_counts, genes: Sequence[str] | None = None, n_top: int = N_TOP_GENES, *,
               target_sum: float | None = None) -> list[int]:
    """Indices of the ``n_top`` most variable genes of the TRAINING spots, in panel order.

    scanpy ``highly_variable_genes(flavor="seurat")`` on ``log1p``-normalised training counts: genes
    are binned by mean expression and ranked by their dispersion (variance / mean) normalised within
    the bin, so highly expressed genes do not win on scale alone. scanpy keeps every gene tied with
    the ``n_top``-th score (possibly more than ``n_top``); here exactly ``n_top`` are kept, ties broken
    by the lower gene index, so the choice is deterministic. Genes constant over the normalised
    training spots (e.g. never detected there) are never chosen, even if fewer than ``n_top`` remain.

    Parameters
    ----------
    train_counts
        ``(n_spots, n_genes)`` raw counts of the training spots only.
    genes
        Gene names (only checked for length; the result is positional).
    n_top
        Number of genes to choose (all variable genes if the panel has fewer).
    target_sum
        Library size for normalisation; ``None`` uses the median spot total of ``train_counts``.
    """
    import anndata as ad
    import scanpy as sc

    counts = np.asarray(train_counts)
    if counts.ndim != 2:
        raise ValueError(f"train counts must be 2-D (spots, genes), got shape {counts.shape}")
    if genes is not None and len(genes) != counts.shape[1]:
        raise ValueError(f"{len(genes)} gene names for {counts.shape[1]} genes")
    if n_top < 1:
        raise ValueError(f"n_top must be positive, got {n_top}")
    if counts.shape[0] < 2:
        raise ValueError(f"need at least 2 training spots to rank gene variability, got {counts.shape[0]}")
    x = log1p_normalised(counts, median_total(counts) if target_sum is None else target_sum)
    adata = ad.AnnData(x.astype(np.float64))
    # Only scanpy's per-gene scores are used: its n_top_genes path keeps ties beyond n_top and fails
    # outright when no gene has a finite normalised dispersion.
    df = sc.pp.highly_variable_genes(adata, flavor="seurat", inplace=False)
    score = np.asarray(df["dispersions_norm"], dtype=np.float64)
    # A variable gene in a mean bin whose dispersions are all equal has no finite normalised
    # dispersion; scanpy's cutoff path scores it 0 ("similar to Seurat"), and so does this one.
    score = np.nan_to_num(score, nan=0.0, posinf=np.inf, neginf=-np.inf)
    score = np.where(x.var(0) > 0, score, -np.inf)
    # lexsort sorts by the last key first: decreasing score, then increasing index.
    order = np.lexsort((np.arange(score.size), -score))
    chosen = [int(i) for i in order[:n_top] if np.isfinite(score[i])]
    return sorted(chosen)


def pearson_per_column(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r of each column; NaN where ``y_true`` is constant, 0 where only ``y_pred`` is."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    t = t - t.mean(0)
    p = p - p.mean(0)
    st = np.sqrt((t * t).sum(0))
    sp = np.sqrt((p * p).sum(0))
    # A tolerance relative to the column scale: float32 targets that are constant can keep a
    # rounding-level spread after centring.
    t_const = st <= 1e-12 * np.maximum(1.0, np.abs(np.asarray(y_true, dtype=np.float64)).max(0, initial=0.0))
    p_const = sp <= 1e-12 * np.maximum(1.0, np.abs(np.asarray(y_pred, dtype=np.float64)).max(0, initial=0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (t * p).sum(0) / (st * sp)
    r = np.where(p_const, 0.0, r)
    r = np.where(t_const, np.nan, r)
    return np.clip(r, -1.0, 1.0)


def _features(train_X: np.ndarray, test_X: np.ndarray, *, standardize: bool, pca_dim: int | None, seed: int):
    """Scaler and PCA fitted on the training features only; returns transformed (train, test)."""
    if standardize:
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(train_X)
        train_X, test_X = scaler.transform(train_X), scaler.transform(test_X)
    if pca_dim is not None and train_X.shape[1] > pca_dim:
        from sklearn.decomposition import PCA

        n_comp = min(pca_dim, train_X.shape[0])
        pca = PCA(n_components=n_comp, random_state=seed).fit(train_X)
        train_X, test_X = pca.transform(train_X), pca.transform(test_X)
    return train_X, test_X


def _check_pairs(X, counts, what: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    counts = np.asarray(counts)
    if X.ndim != 2 or counts.ndim != 2:
        raise ValueError(f"{what} features and counts must be 2-D, got {X.shape} and {counts.shape}")
    if len(X) != len(counts):
        raise ValueError(f"{what}: {len(X)} feature rows but {len(counts)} count rows")
    if not np.isfinite(X).all():
        raise ValueError(f"{what} features contain NaN or infinite values")
    return X, counts


def expression_probe(train_X, train_counts, test_X, test_counts, *, hvg_idx: Sequence[int],
                     target_sum: float | None, genes: Sequence[str] | None = None, groups_train=None,
                     groups_test=None, standardize: bool = True, pca_dim: int | None = PCA_DIM, seed: int = 0,
                     return_predictions: bool = False) -> dict:
    """Fit a ridge probe on training spots, score Pearson r per gene on test spots.

    Parameters
    ----------
    train_X, test_X
        ``(n_spots, dim)`` embeddings (trunk features or aligned embeddings) of training / test spots.
    train_counts, test_counts
        ``(n_spots, n_genes)`` raw counts of the same spots, in the same order.
    hvg_idx
        Target genes (columns of the counts), chosen on the training split (:func:`select_hvg`).
    target_sum
        Library size of the targets (the training median spot total); ``None``: ``log1p(counts)``.
    genes
        Gene names of the count columns; defaults to ``gene_<index>``.
    groups_train, groups_test
        Donor (or sample) of each spot; when both are given, a donor on both sides is an error, since
        the probe must be scored on donors it never saw.
    standardize
        Standardise features with statistics of the training spots (HEST).
    pca_dim
        Reduce wider features to this many principal components of the training spots (HEST: 256);
        ``None`` keeps every dimension.
    seed
        Random state of the PCA solver.
    return_predictions
        Also return the ``(n_test, n_genes)`` predictions and targets.

    Returns
    -------
    dict
        ``pearson`` (gene -> r, NaN for a gene constant on the test spots), ``mean`` and ``std`` over
        genes with a defined r, ``n_genes`` (targets), ``n_nan`` (genes left out), ``nan_genes``,
        ``n_train``, ``n_test``, ``dim`` (feature width the ridge saw), ``alpha``, and, when asked,
        ``predictions`` and ``targets``.
    """
    from sklearn.linear_model import Ridge

    train_X, train_counts = _check_pairs(train_X, train_counts, "training")
    test_X, test_counts = _check_pairs(test_X, test_counts, "test")
    if train_X.shape[1] != test_X.shape[1] or train_counts.shape[1] != test_counts.shape[1]:
        raise ValueError(f"training and test widths differ: features {train_X.shape[1]} vs {test_X.shape[1]}, "
                         f"genes {train_counts.shape[1]} vs {test_counts.shape[1]}")
    hvg_idx = [int(i) for i in hvg_idx]
    if not hvg_idx:
        raise ValueError("no target genes (hvg_idx is empty)")
    n_all = train_counts.shape[1]
    if min(hvg_idx) < 0 or max(hvg_idx) >= n_all:
        raise ValueError(f"hvg_idx out of range for {n_all} genes")
    names = list(genes) if genes is not None else [f"gene_{i}" for i in range(n_all)]
    if len(names) != n_all:
        raise ValueError(f"{len(names)} gene names for {n_all} genes")
    n_train_groups = None
    if groups_train is not None:
        groups_train = np.asarray(groups_train)
        if len(groups_train) != len(train_X):
            raise ValueError(f"{len(groups_train)} training groups for {len(train_X)} training spots")
        n_train_groups = len(np.unique(groups_train))
        if groups_test is not None:
            shared = sorted(set(np.unique(groups_train).tolist()) & set(np.unique(groups_test).tolist()))
            if shared:
                raise ValueError(f"groups {shared[:10]} appear in both training and test spots; "
                                 "the probe must be scored on held-out donors")

    # Library sizes are totals over the whole panel, so normalise first and select the genes after.
    y_train = log1p_normalised(train_counts, target_sum)[:, hvg_idx]
    y_test = log1p_normalised(test_counts, target_sum)[:, hvg_idx]
    Xtr, Xte = _features(train_X, test_X, standardize=standardize, pca_dim=pca_dim, seed=seed)
    alpha = ridge_alpha(Xtr.shape[1], len(hvg_idx))
    model = Ridge(alpha=alpha, fit_intercept=False).fit(Xtr, y_train.astype(np.float64))
    pred = model.predict(Xte).reshape(len(Xte), len(hvg_idx))
    r = pearson_per_column(y_test, pred)
    ok = ~np.isnan(r)
    target_names = [names[i] for i in hvg_idx]
    out = {
        "pearson": {g: float(v) for g, v in zip(target_names, r, strict=True)},
        "mean": float(r[ok].mean()) if ok.any() else float("nan"),
        "std": float(r[ok].std()) if ok.any() else float("nan"),
        "n_genes": len(hvg_idx),
        "n_nan": int((~ok).sum()),
        "nan_genes": [g for g, good in zip(target_names, ok, strict=True) if not good],
        "n_train": len(train_X),
        "n_test": len(test_X),
        "n_train_groups": n_train_groups,
        "dim": int(Xtr.shape[1]),
        "alpha": alpha,
    }
    if return_predictions:
        out["predictions"] = pred
        out["targets"] = y_test
    return out


def grouped_expression_probe(X, counts, groups, *, train_mask=None, genes: Sequence[str] | None = None,
                             n_top: int = N_TOP_GENES, target_sum: float | str | None = "train_median",
                             n_splits: int = N_SPLITS, standardize: bool = True, pca_dim: int | None = PCA_DIM,
                             seed: int = 0) -> dict:
    """The probe over folds that hold out whole groups (donors), for panels with few donors.

    With at most ``n_splits`` groups every group is held out in turn (leave-one-group-out); with
    more, ``GroupKFold(n_splits)`` (deterministic: no shuffling). In each fold the target genes,
    ``target_sum``, scaler and PCA are fitted on the fold's training spots only.

    Parameters
    ----------
    X
        ``(n_spots, dim)`` embeddings.
    counts
        ``(n_spots, n_genes)`` raw counts.
    groups
        Group (donor) of each spot.
    train_mask
        Spots allowed in a fold's training part (e.g. to keep the validation split out); default all.
        A fold's test part is every spot of its held-out groups.
    genes
        Gene names of the count columns.
    n_top
        Target genes per fold (:func:`select_hvg`).
    target_sum
        ``"train_median"`` (the fold's training median spot total), a number, or ``None`` (log1p).
    n_splits, standardize, pca_dim, seed
        As in :func:`expression_probe`; ``n_splits`` also decides leave-one-group-out.

    Returns
    -------
    dict
        ``mean`` and ``std`` over folds of the per-fold mean r, ``scheme``
        (``"leave-one-group-out"`` or ``"group-k-fold"``), ``n_folds``, ``pearson`` (gene -> mean r over
        the folds where it was a target), and ``folds``: per fold ``test_groups``, ``genes``, ``mean``,
        ``std``, ``n_genes``, ``n_nan``, ``n_train``, ``n_test``.
    """
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    X, counts = _check_pairs(X, counts, "probe")
    groups = np.asarray(groups)
    if len(groups) != len(X):
        raise ValueError(f"{len(groups)} groups for {len(X)} spots")
    mask = np.ones(len(X), dtype=bool) if train_mask is None else np.asarray(train_mask, dtype=bool)
    if mask.shape != (len(X),):
        raise ValueError(f"train_mask has shape {mask.shape}, expected ({len(X)},)")
    names = list(genes) if genes is not None else [f"gene_{i}" for i in range(counts.shape[1])]
    if not (target_sum is None or target_sum == "train_median" or isinstance(target_sum, numbers.Real)):
        raise ValueError(f"target_sum must be 'train_median', a number or None, got {target_sum!r}")
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"grouped folds need at least 2 groups, got {n_groups}")
    if n_groups <= n_splits:
        splitter, scheme = LeaveOneGroupOut(), "leave-one-group-out"
    else:
        splitter, scheme = GroupKFold(n_splits=n_splits), "group-k-fold"

    folds = []
    per_gene: dict[str, list[float]] = {}
    for train_idx, test_idx in splitter.split(X, groups=groups):
        train_idx = train_idx[mask[train_idx]]
        if len(train_idx) < 2:
            raise ValueError(f"a fold holding out {sorted(np.unique(groups[test_idx]).tolist())} has "
                             f"{len(train_idx)} training spots")
        fold_counts = counts[train_idx]
        ts = median_total(fold_counts) if target_sum == "train_median" else target_sum
        hvg = select_hvg(fold_counts, names, n_top, target_sum=ts)
        res = expression_probe(X[train_idx], fold_counts, X[test_idx], counts[test_idx], hvg_idx=hvg,
                               target_sum=ts, genes=names, groups_train=groups[train_idx],
                               groups_test=groups[test_idx], standardize=standardize, pca_dim=pca_dim, seed=seed)
        for g, v in res["pearson"].items():
            per_gene.setdefault(g, []).append(v)
        folds.append({
            "test_groups": sorted(np.unique(groups[test_idx]).tolist()),
            "genes": [names[i] for i in hvg],
            **{k: res[k] for k in ("mean", "std", "n_genes", "n_nan", "n_train", "n_test")},
        })
    means = np.array([f["mean"] for f in folds], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        pearson = {g: float(np.nanmean(v)) if not np.isnan(v).all() else float("nan")
                   for g, v in per_gene.items()}
    return {
        "mean": float(np.nanmean(means)) if not np.isnan(means).all() else float("nan"),
        "std": float(np.nanstd(means)) if not np.isnan(means).all() else float("nan"),
        "scheme": scheme,
        "n_folds": len(folds),
        "pearson": pearson,
        "folds": folds,
    }
