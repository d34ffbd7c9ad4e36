"""Report figures (matplotlib, Agg backend, PNG): embedding maps, Recall@k curves, training curves and
grid heatmaps. Each function takes plain arrays / tables and writes one file, so the figures can be
rebuilt without MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's first import in this process
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from hescape.io import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
    return path


#  2-D maps of embeddings


def project_2d(x: np.ndarray, *, method: str = "umap", seed: int = 0, n_neighbors: int = 15) -> tuple[np.ndarray, str]:
    """2-D coordinates of ``x`` rows by UMAP (or PCA); returns ``(coords, method used)``.

    ``method="umap"`` falls back to PCA when umap-learn is missing or fails (the caller notes it).
    """
    x = np.asarray(x, np.float32)
    if method == "umap" and len(x) > n_neighbors + 1:
        try:
            import umap

            reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=0.3, random_state=seed, n_jobs=1)
            return np.asarray(reducer.fit_transform(x)), "umap"
        except Exception as exc:  # noqa: BLE001 - any UMAP failure degrades to PCA, noted in the report
            log.warning("UMAP failed (%s); using PCA", exc)
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords, "pca"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def embedding_map(image: np.ndarray, gene: np.ndarray, colour_by: dict[str, np.ndarray], path: Path, *,
                  title: str, method: str = "umap", max_points: int = 2000, seed: int = 0) -> str:
    """One joint 2-D map of the test image and gene embeddings (unit-normalised, as retrieval sees
    them), drawn once per modality and per colouring (e.g. donor, tissue); returns the method used.

    A joint map shows alignment directly: matching pairs of the two modalities land close together.
    """
    plt = _plt()
    n = len(image)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)
    both = np.concatenate([_unit(image[idx]), _unit(gene[idx])])
    coords, used = project_2d(both, method=method, seed=seed)
    img_xy, gene_xy = coords[: len(idx)], coords[len(idx):]
    names = list(colour_by)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 8), squeeze=False)
    for j, name in enumerate(names):
        values = np.asarray(colour_by[name])[idx].astype(str)
        cats = sorted(set(values))
        cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
        for i, (label, xy) in enumerate((("image", img_xy), ("gene", gene_xy))):
            ax = axes[i, j]
            ax.scatter(coords[:, 0], coords[:, 1], s=2, c="#dddddd", linewidths=0)  # the other modality
            for c_i, cat in enumerate(cats):
                m = values == cat
                ax.scatter(xy[m, 0], xy[m, 1], s=3, color=cmap(c_i % cmap.N), label=cat, linewidths=0)
            ax.set_title(f"{label} embedding, by {name}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.legend(fontsize=6, markerscale=3, loc="best", frameon=False)
    fig.suptitle(f"{title} ({used.upper()}, {len(idx)} test spots per modality)", fontsize=10)
    _save(fig, path)
    return used


#  Curves


def recall_curves(curves: dict[str, dict], path: Path, *, chance_n: dict[str, float]) -> Path:
    """Recall@k against k, rows protocol (batch, global) x columns direction (I2G, G2I).

    Parameters
    ----------
    curves
        ``{label: metrics.json checkpoint "curves" entry}`` (``k``, ``batch``, ``global``).
    chance_n
        Number of candidates per query in each protocol (chance Recall@k = k / n).
    """
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharey=True)
    for i, protocol in enumerate(("batch", "global")):
        for j, direction in enumerate(("I2G", "G2I")):
            ax = axes[i, j]
            kmax = 0
            for label, c in curves.items():
                ys = (c.get(protocol) or {}).get(direction) or []
                if ys:
                    ks = np.arange(1, len(ys) + 1)
                    ax.plot(ks, ys, label=label, lw=1.4)
                    kmax = max(kmax, len(ys))
            if kmax and chance_n.get(protocol):
                ks = np.arange(1, kmax + 1)
                ax.plot(ks, np.minimum(1, ks / chance_n[protocol]), "k--", lw=1, label="chance")
            ax.set_title(f"{direction}, {protocol} protocol", fontsize=10)
            ax.set_xlabel("k")
            ax.set_ylabel("Recall@k")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(4, max(1, len(labels))),
               bbox_to_anchor=(0.5, -0.06), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(histories: dict[str, dict[str, list[tuple[int, float]]]], path: Path,
                    metrics=("train_loss_epoch", "val_loss", "val_R_at_5")) -> Path:
    """Per-epoch training metrics of every run, one panel per metric."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    for j, metric in enumerate(metrics):
        ax = axes[0, j]
        for label, hist in histories.items():
            points = sorted(hist.get(metric) or [])
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=2.5, lw=1.2, label=label)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(4, len(labels)),
                   bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def grid_heatmap(tables: dict[tuple, pd.DataFrame], path: Path, *, title: str) -> Path:
    """Annotated heatmaps (gene encoder x image encoder), one per (panel, loss, strategy)."""
    plt = _plt()
    n = max(1, len(tables))
    fig, axes = plt.subplots(1, n, figsize=(max(4.0, 1.5 + 1.3 * max((t.shape[1] for t in tables.values()),
                                                                     default=1)) * n, 3.6), squeeze=False)
    for ax, (key, table) in zip(axes[0], tables.items(), strict=False):
        data = table.to_numpy(float)
        # One colour scale per table: global R@5 is an order of magnitude below batch R@5.
        vmax = float(np.nanmax(data)) if np.isfinite(data).any() else 1.0
        im = ax.imshow(data, cmap="viridis", vmin=0, vmax=vmax or 1.0, aspect="auto")
        ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(table.shape[0]), [str(r) for r in table.index], fontsize=8)
        for (r, c), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 * (vmax or 1) else "black")
        ax.set_title(" / ".join(str(k) for k in key), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
