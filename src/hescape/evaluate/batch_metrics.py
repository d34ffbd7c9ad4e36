"""Batch-effect metrics of embeddings (scIB's integration scores), as pure functions on arrays.

Computed on image and gene embeddings before and after alignment, with sample (and donor) as batch
and tissue (and the simulator's dominant cell type) as label. Batch mixing: ``ilisi``,
``batch_silhouette``, ``graph_connectivity``; conservation: ``nmi``, ``ari``, ``label_silhouette``.
Every score is scaled so that higher is better, as scIB (Luecken et al. 2022) reports them:

``ilisi`` in [0, 1]
    Median over cells of the inverse Simpson index of batches among a cell's ``lisi_neighbors`` (90)
    neighbours (perplexity 30), rescaled ``(median - 1) / (n_batches - 1)``: 1 = every neighbourhood
    holds all batches evenly (``scib_metrics.ilisi_knn``).
``batch_silhouette`` in [0, 1]
    Within each label, ``1 - |silhouette of the batches|`` averaged over the label's cells, then over
    labels: 1 = batches overlap (``scib_metrics.silhouette_batch``).
``graph_connectivity`` in (0, 1]
    Mean over labels of the share of the label's cells in the largest connected component of the
    kNN graph (``n_neighbors`` = 15) restricted to the label: 1 = no label is split, by batch or
    otherwise.
``nmi`` in [0, 1], ``ari`` in [-0.5, 1] (0 = chance)
    Normalised mutual information (arithmetic mean) and adjusted Rand index of k-means clusters
    (k = number of labels) with the labels (as ``scib_metrics.nmi_ari_cluster_labels_kmeans``).
``label_silhouette`` in [0, 1]
    ``(silhouette of the labels + 1) / 2`` (``scib_metrics.silhouette_label``).

Implementation: scib-metrics 0.5.10 installs into the pinned stack without changing a pin, so its
functions compute ``ilisi``, ``batch_silhouette`` and ``label_silhouette``, on exact Euclidean
neighbours from scikit-learn wrapped in its ``NeighborsResults`` (its default, pynndescent, compiles
for ~45 s in every new process). Two scores follow its definitions on other code:

- ``graph_connectivity`` is computed here on the undirected kNN graph, as scIB defines it (scanpy's
  symmetric connectivities). scib-metrics takes strongly connected components of the DIRECTED kNN
  graph, which splits off every cell that no other cell counts among its neighbours: a single
  Gaussian blob of 1,000 cells scores 0.956 there (44 components) and 1 here.
- ``nmi``/``ari`` cluster with scikit-learn's k-means (:func:`nmi_ari_kmeans` says why).

jax compiles each scib-metrics function once per array shape and process (a few seconds each; the
batch silhouette once per distinct label-group size), so the first report of a process pays ~20-40 s.

Undefined scores are NaN: batch scores with fewer than 2 batches (or no label with 2 batches for the
silhouette), label scores with fewer than 2 labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from hescape.data import keys

#: Neighbours of the kNN graph (graph connectivity), as scIB.
N_NEIGHBORS = 15
#: Neighbours of iLISI (perplexity = a third), as scib-metrics' Benchmarker.
LISI_NEIGHBORS = 90
#: Cells :func:`batch_report` keeps at most (silhouettes cost O(n^2)).
MAX_CELLS = 20_000

BATCH_METRICS = ("ilisi", "batch_silhouette", "graph_connectivity")
LABEL_METRICS = ("nmi", "ari", "label_silhouette")


def knn(emb: np.ndarray, n_neighbors: int):
    """Exact Euclidean neighbours, the cell itself first (distance 0): scib-metrics' ``NeighborsResults``.

    Asking scikit-learn for the neighbours of the fitted points excludes each point itself even when
    it has exact duplicates, so the self column is added explicitly rather than hoped for.
    """
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    emb = np.asarray(emb, dtype=np.float32)
    n = len(emb)
    k = min(n_neighbors, n)
    if k < 2:
        idx = np.arange(n)[:, None]
        return NeighborsResults(indices=idx, distances=np.zeros((n, 1), dtype=np.float32))
    dist, idx = NearestNeighbors(n_neighbors=k - 1).fit(emb).kneighbors()
    idx = np.hstack([np.arange(n)[:, None], idx])
    dist = np.hstack([np.zeros((n, 1)), dist]).astype(np.float32)
    return NeighborsResults(indices=idx, distances=dist)


def graph_connectivity(indices: np.ndarray, labels) -> float:
    """scIB's graph connectivity on the undirected kNN graph given by ``indices`` ``(n, k)``."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    indices = np.asarray(indices)
    n, k = indices.shape
    graph = csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), indices.ravel())), shape=(n, n))
    codes = pd.factorize(np.asarray(labels), use_na_sentinel=False)[0]
    shares = []
    for c in np.unique(codes):
        mask = codes == c
        _, comp = connected_components(graph[mask][:, mask], directed=False)
        shares.append(np.bincount(comp).max() / mask.sum())
    return float(np.mean(shares))


def _codes(values, n: int, what: str) -> np.ndarray:
    """Integer codes (missing values form their own category)."""
    codes = pd.factorize(np.asarray(values), use_na_sentinel=False)[0]
    if len(codes) != n:
        raise ValueError(f"{len(codes)} {what} values for {n} cells")
    return codes


def _prepare(emb, normalize: bool) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embedding must be 2-D (cells, dim), got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embedding contains NaN or infinite values")
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def _ilisi(nn, b: np.ndarray, lisi_neighbors: int) -> float:
    import scib_metrics

    if len(np.unique(b)) < 2:
        return float("nan")
    if nn.n_neighbors > lisi_neighbors:
        nn = nn.subset_neighbors(lisi_neighbors)
    return float(scib_metrics.ilisi_knn(nn, b))


def _batch_silhouette(x: np.ndarray, lab: np.ndarray, b: np.ndarray) -> float:
    import scib_metrics

    # scib-metrics skips labels with one batch (or as many batches as cells) and fails when it has
    # skipped them all: the score is then undefined (always so with a single batch).
    usable = any(1 < len(np.unique(b[lab == c])) < (lab == c).sum() for c in np.unique(lab))
    return float(scib_metrics.silhouette_batch(x, lab, b)) if usable else float("nan")


def _label_scores(x: np.ndarray, nn, lab: np.ndarray, n_neighbors: int, *, labelled: bool = True) -> dict:
    import scib_metrics

    n_labels = len(np.unique(lab))
    out = {"graph_connectivity": graph_connectivity(nn.indices[:, :n_neighbors], lab),
           "nmi": float("nan"), "ari": float("nan"), "label_silhouette": float("nan")}
    if labelled and 2 <= n_labels < len(x):
        out["nmi"], out["ari"] = nmi_ari_kmeans(x, lab)
        out["label_silhouette"] = float(scib_metrics.silhouette_label(x, lab))
    return out


def nmi_ari_kmeans(x: np.ndarray, labels, seed: int = 0) -> tuple[float, float]:
    """NMI (arithmetic) and ARI of k-means clusters, k = number of labels, with the labels.

    The definition of ``scib_metrics.nmi_ari_cluster_labels_kmeans``, on scikit-learn's k-means
    (k-means++, 10 initialisations, seeded): scib-metrics' jax k-means is jit-compiled with the
    estimator as a static argument, so it recompiles on every call (4-6 s each here, for each
    embedding x label key of a report), and it runs a single initialisation.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = np.asarray(labels)
    k = len(np.unique(labels))
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(np.asarray(x, dtype=np.float64))
    return (float(normalized_mutual_info_score(labels, pred, average_method="arithmetic")),
            float(adjusted_rand_score(labels, pred)))


def batch_metrics(emb, batch, label=None, *, n_neighbors: int = N_NEIGHBORS, lisi_neighbors: int = LISI_NEIGHBORS,
                  normalize: bool = False) -> dict[str, float]:
    """Batch-mixing and label-conservation scores of one embedding (see the module docstring).

    Parameters
    ----------
    emb
        ``(n_cells, dim)`` embedding.
    batch
        Batch (sample or donor) of each cell.
    label
        Label (tissue or cell type) of each cell; ``None`` treats all cells as one label (then
        ``nmi``, ``ari`` and ``label_silhouette`` are NaN).
    n_neighbors
        Neighbours of the kNN graph of ``graph_connectivity``.
    lisi_neighbors
        Neighbours of ``ilisi`` (perplexity a third of it).
    normalize
        L2-normalise the rows first (Euclidean distance then ranks like cosine similarity, the
        similarity contrastive training optimises).

    Returns
    -------
    dict
        ``ilisi``, ``batch_silhouette``, ``graph_connectivity``, ``nmi``, ``ari``, ``label_silhouette``,
        ``n_batches``, ``n_labels``.
    """
    x = _prepare(emb, normalize)
    b = _codes(batch, len(x), "batch")
    lab = np.zeros(len(x), dtype=np.int64) if label is None else _codes(label, len(x), "label")
    nn = knn(x, max(n_neighbors, lisi_neighbors))
    out = {"ilisi": _ilisi(nn, b, lisi_neighbors), "batch_silhouette": _batch_silhouette(x, lab, b)}
    out.update(_label_scores(x, nn, lab, n_neighbors, labelled=label is not None))
    out["n_batches"] = len(np.unique(b))
    out["n_labels"] = len(np.unique(lab))
    return out


def subsample_rows(n: int, max_cells: int | None, seed: int = 0) -> np.ndarray:
    """Sorted row indices: all rows, or ``max_cells`` of them drawn without replacement with ``seed``."""
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))


def batch_report(emb_by_name: Mapping[str, np.ndarray], obs: pd.DataFrame,
                 batch_keys: Iterable[str] = (keys.SAMPLE, keys.DONOR),
                 label_keys: Iterable[str] = (keys.TISSUE, keys.CELL_TYPE), *, n_neighbors: int = N_NEIGHBORS,
                 lisi_neighbors: int = LISI_NEIGHBORS, max_cells: int | None = MAX_CELLS, seed: int = 0,
                 normalize: bool = False) -> dict[str, float]:
    """Batch-effect metrics of several embeddings of the same cells, as flat MLflow-friendly keys.

    Each score is computed once for what it depends on:

    - ``{name}.batch={batch_key}.ilisi``
    - ``{name}.batch={batch_key}.label={label_key}.batch_silhouette`` (``{name}.batch={batch_key}.
      batch_silhouette`` when no label key is present)
    - ``{name}.label={label_key}.graph_connectivity`` / ``.nmi`` / ``.ari`` / ``.label_silhouette``
    - ``{name}.n_cells``

    Parameters
    ----------
    emb_by_name
        e.g. ``{"image_trunk": ..., "image_aligned": ..., "gene_input": ..., "gene_aligned": ...}``,
        each ``(len(obs), dim)`` with rows in ``obs`` order.
    obs
        Per-cell table; keys absent from it are skipped.
    batch_keys, label_keys
        Columns used as batch / label.
    n_neighbors, lisi_neighbors, normalize
        As in :func:`batch_metrics`.
    max_cells
        Score a random subset of at most this many cells (the same rows for every embedding);
        ``None`` scores all.
    seed
        Seed of the subset.
    """
    batch_keys = [k for k in batch_keys if k in obs.columns]
    label_keys = [k for k in label_keys if k in obs.columns]
    rows = subsample_rows(len(obs), max_cells, seed)
    sub = obs.iloc[rows]
    out: dict[str, float] = {}
    for name, emb in emb_by_name.items():
        emb = np.asarray(emb)
        if len(emb) != len(obs):
            raise ValueError(f"embedding {name!r} has {len(emb)} rows but obs has {len(obs)}")
        x = _prepare(emb[rows], normalize)
        nn = knn(x, max(n_neighbors, lisi_neighbors))
        out[f"{name}.n_cells"] = len(rows)
        labels = {lk: _codes(sub[lk], len(x), lk) for lk in label_keys}
        for bk in batch_keys:
            b = _codes(sub[bk], len(x), bk)
            out[f"{name}.batch={bk}.ilisi"] = _ilisi(nn, b, lisi_neighbors)
            if not labels:
                out[f"{name}.batch={bk}.batch_silhouette"] = _batch_silhouette(x, np.zeros(len(x), np.int64), b)
            for lk, lab in labels.items():
                out[f"{name}.batch={bk}.label={lk}.batch_silhouette"] = _batch_silhouette(x, lab, b)
        for lk, lab in labels.items():
            for metric, value in _label_scores(x, nn, lab, n_neighbors).items():
                out[f"{name}.label={lk}.{metric}"] = value
    return out
