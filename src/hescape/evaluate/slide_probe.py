"""Slide-label probe (the mutation task), as pure functions on arrays.

Each sample (slide) carries one label (the simulator's ``mutation``, or any per-sample column a user
names). Patch embeddings are pooled per sample, a standardised logistic regression predicts the label
under cross-validation that never puts a donor's samples on both sides, and the out-of-fold scores
give an AUROC with a percentile bootstrap interval over samples. Run it on embeddings before and
after alignment to see what alignment did to slide-level information.

Conventions
-----------
- Binary labels: the positive class is the larger label in sorted order (1 of 0/1, ``"True"`` of
  ``"False"``/``"True"``). More than two classes: macro one-vs-rest AUROC.
- Cross-validation over samples with ``k = min(n_splits, samples of the rarer class)`` folds:
  ``StratifiedKFold(k)``; with ``groups`` (donors) also ``k <= n_donors``, leave-one-group-out when
  ``k`` equals the number of donors, else ``StratifiedGroupKFold(k)``. Folds are shuffled with
  ``seed``. Leave-one-out over samples is deliberately not used (see ``_splits``).
- A fold whose training part lacks a class (e.g. one donor holds every positive sample) cannot fit a
  classifier; the result is then undefined with a ``reason`` naming the fold, since any stand-in
  score would be ranked against the other folds' probabilities and bias the AUROC.
- AUROC follows ``sklearn.metrics.roc_auc_score`` (tied scores count one half). The interval is the
  2.5 and 97.5 percentiles over ``n_bootstrap`` resamples of samples with replacement; resamples
  missing a class are skipped and ``n_bootstrap_used`` says how many remained.
- Only one class among the samples, or a single donor: AUROC is undefined; the result says so
  (``auroc`` NaN and a ``reason``) instead of raising, so a report can still be written.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hescape.errors import DataError

#: Pooling functions of :func:`pool_by_sample`.
POOLING = ("mean", "max")


class SampleLabelError(DataError, ValueError):
    """A per-sample value (label or donor) differs between spots of one sample."""


def pool_by_sample(emb, sample_ids, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Pool spot embeddings per sample.

    Parameters
    ----------
    emb
        ``(n_spots, dim)`` embeddings.
    sample_ids
        Sample of each spot.
    how
        ``"mean"`` or ``"max"`` (per dimension).

    Returns
    -------
    pooled
        ``(n_samples, dim)`` float64, one row per sample in order of first appearance.
    sample_order
        The sample ids of the rows.
    """
    if how not in POOLING:
        raise ValueError(f"unknown pooling {how!r}; known: {', '.join(POOLING)}")
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (spots, dim), got shape {emb.shape}")
    sample_ids = np.asarray(sample_ids)
    if len(sample_ids) != len(emb):
        raise ValueError(f"{len(sample_ids)} sample ids for {len(emb)} embeddings")
    codes, order = pd.factorize(sample_ids)  # first-appearance order
    pooled = np.zeros((len(order), emb.shape[1]))
    if how == "mean":
        np.add.at(pooled, codes, emb)
        pooled /= np.bincount(codes, minlength=len(order))[:, None]
    else:
        pooled[:] = -np.inf
        np.maximum.at(pooled, codes, emb)
    return pooled, np.asarray(order)


def per_sample_value(values, sample_ids, sample_order, what: str) -> np.ndarray:
    """The one value each sample carries; :class:`SampleLabelError` naming a sample where it varies."""
    frame = pd.DataFrame({"sample": np.asarray(sample_ids), "value": np.asarray(values)})
    n_distinct = frame.groupby("sample", sort=False)["value"].nunique(dropna=False)
    bad = n_distinct[n_distinct > 1]
    if len(bad):
        sample = bad.index[0]
        seen = sorted(map(str, frame.loc[frame["sample"] == sample, "value"].unique()))
        raise SampleLabelError(f"{what} is not constant within sample {sample!r}: values {seen}"
                               + (f" ({len(bad) - 1} more samples too)" if len(bad) > 1 else ""),
                               record=str(sample), field=what)
    first = frame.groupby("sample", sort=False)["value"].first()
    return first.loc[list(sample_order)].to_numpy()


def _plain(value):
    """A numpy scalar as the Python value (JSON-friendly)."""
    return value.item() if isinstance(value, np.generic) else value


def _auroc(y: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> float:
    if len(classes) == 2:
        # Mann-Whitney U with mid-ranks: roc_auc_score's value (ties count one half) without its
        # input validation, which dominates the cost of a thousand bootstrap resamples.
        from scipy.stats import rankdata

        pos = y == classes[1]
        n_pos = int(pos.sum())
        n_neg = len(y) - n_pos
        ranks = rankdata(scores[:, 1])
        return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores, multi_class="ovr", average="macro", labels=classes))


def auroc_with_ci(y_true, scores, *, n_bootstrap: int = 1000, seed: int = 0, classes=None) -> dict:
    """AUROC and its percentile bootstrap 95% interval over samples.

    Parameters
    ----------
    y_true
        ``(n,)`` labels.
    scores
        ``(n,)`` scores of the positive class (binary), or ``(n, n_classes)`` class probabilities.
    n_bootstrap
        Resamples (0: no interval).
    seed
        Seed of the resampling.
    classes
        Sorted class labels (default: those present in ``y_true``).

    Returns
    -------
    dict
        ``auroc``, ``ci_low``, ``ci_high``, ``n_bootstrap_used``.
    """
    y = np.asarray(y_true)
    classes = np.unique(y) if classes is None else np.asarray(classes)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        if len(classes) != 2:
            raise ValueError(f"1-D scores need exactly 2 classes, got {len(classes)}")
        s = np.stack([1.0 - s, s], axis=1)
    if len(s) != len(y):
        raise ValueError(f"{len(s)} scores for {len(y)} labels")
    auroc = _auroc(y, s, classes)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < len(classes):
            continue  # AUROC needs every class in the resample
        boot.append(_auroc(y[idx], s[idx], classes))
    low, high = (np.percentile(boot, [2.5, 97.5]) if boot else (np.nan, np.nan))
    return {"auroc": auroc, "ci_low": float(low), "ci_high": float(high), "n_bootstrap_used": len(boot)}


def _splits(y: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int):
    """Cross-validation folds over samples and the scheme's name (see the module docstring)."""
    from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold, StratifiedKFold

    dummy = np.zeros((len(y), 1))
    # Never fewer samples of a class per fold than one: k is capped by the rarer class. Leave-one-out
    # is avoided on purpose: holding out one sample shifts the training class balance against it,
    # which pushes pooled out-of-fold AUROCs below chance (random embeddings of 8 samples: 0.40 +- 0.26
    # over 40 seeds, against 0.54 +- 0.25 with 4 stratified folds).
    k = min(n_splits, int(np.bincount(pd.factorize(y)[0]).min()))
    if groups is not None:
        n_groups = len(np.unique(groups))
        if n_groups < 2:
            return None, f"only one group ({_plain(groups[0])!r}): grouped cross-validation needs at least 2"
        k = min(k, n_groups)
        if k == n_groups:
            return list(LeaveOneGroupOut().split(dummy, y, groups)), "leave-one-group-out"
        if k < 2:
            return None, "a class has a single sample: cross-validation cannot train on it and test it"
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(cv.split(dummy, y, groups)), f"stratified-group-{k}-fold"
    if k < 2:
        return None, "a class has a single sample: cross-validation cannot train on it and test it"
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(cv.split(dummy, y)), f"stratified-{k}-fold"


def slide_label_probe(emb, sample_ids, labels, *, groups=None, n_splits: int = 5, n_bootstrap: int = 1000,
                      seed: int = 0, how: str = "mean", C: float = 1.0) -> dict:
    """Predict a per-sample label from pooled patch embeddings; AUROC over out-of-fold predictions.

    Parameters
    ----------
    emb
        ``(n_spots, dim)`` patch embeddings.
    sample_ids
        Sample of each spot.
    labels
        Label of each spot; must be constant within a sample.
    groups
        Donor of each spot (constant within a sample); folds then never split a donor.
    n_splits
        Folds at most (see the module docstring for when there are fewer).
    n_bootstrap
        Bootstrap resamples of the AUROC interval.
    seed
        Seed of fold shuffling and of the bootstrap.
    how
        Pooling (:func:`pool_by_sample`).
    C
        Inverse regularisation strength of the logistic regression.

    Returns
    -------
    dict
        ``auroc``, ``ci_low``, ``ci_high``, ``n_bootstrap_used``, ``n_samples``, ``n_positive`` (binary:
        samples of the positive class), ``positive_class``, ``n_classes``, ``cv`` (scheme), ``n_folds``,
        ``reason`` (``None``, or why the AUROC is undefined: then it is NaN).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pooled, order = pool_by_sample(emb, sample_ids, how)
    if not np.isfinite(pooled).all():
        raise ValueError("embeddings contain NaN or infinite values")
    labels = np.asarray(labels)
    if len(labels) != len(np.asarray(sample_ids)):
        raise ValueError(f"{len(labels)} labels for {len(np.asarray(sample_ids))} spots")
    y = per_sample_value(labels, sample_ids, order, "label")
    g = None if groups is None else per_sample_value(groups, sample_ids, order, "group")
    if pd.isna(y).any():
        missing = [str(s) for s, v in zip(order, pd.isna(y), strict=True) if v]
        raise SampleLabelError(f"samples without a label: {missing[:10]}", field="label")
    classes = np.unique(y)
    out = {
        "auroc": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_bootstrap_used": 0,
        "n_samples": len(y), "n_classes": len(classes),
        "positive_class": _plain(classes[-1]) if len(classes) == 2 else None,
        "n_positive": int((y == classes[-1]).sum()) if len(classes) == 2 else None,
        "cv": None, "n_folds": 0, "reason": None,
    }
    if len(classes) < 2:
        out["reason"] = f"only one class ({_plain(classes[0])!r}) among {len(y)} samples: AUROC is undefined"
        return out
    folds, scheme = _splits(y, g, n_splits, seed)
    if folds is None:
        out["reason"] = scheme
        return out
    out.update(cv=scheme, n_folds=len(folds))

    # A fold whose training part lacks a class cannot fit a classifier, and any stand-in score (a
    # prevalence, 0.5) would be ranked against other folds' probabilities and bias the AUROC.
    for train_idx, test_idx in folds:
        missing = sorted(map(str, set(classes.tolist()) - set(np.unique(y[train_idx]).tolist())))
        if missing:
            held_out = sorted(map(str, np.unique(g[test_idx]))) if g is not None else \
                [str(s) for s in order[test_idx]]
            out["reason"] = (f"{scheme}: the fold holding out {held_out[:5]} has no training sample of class "
                             f"{missing}; AUROC is undefined (more donors or samples per class needed)")
            return out

    scores = np.zeros((len(y), len(classes)))
    for train_idx, test_idx in folds:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
        model.fit(pooled[train_idx], y[train_idx])
        # Every class is present in training, so model.classes_ equals ``classes`` (both sorted).
        scores[test_idx] = model.predict_proba(pooled[test_idx])
    out.update(auroc_with_ci(y, scores if len(classes) > 2 else scores[:, 1], n_bootstrap=n_bootstrap, seed=seed,
                             classes=classes))
    return out
