"""The benchmark grid: every evaluated training run of an experiment, as tables.

A run is one (panel, gene encoder, image encoder, loss, strategy, seed); seeds are averaged (mean,
std, count). The grid of the paper is a pivot of one metric with gene encoders as rows and image
encoders as columns, one table per (panel, loss, strategy); the retrieval table puts the
published within-batch protocol and the global (whole test split) protocol side by side.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from hescape import tracking

GROUP = ["panel", "loss", "strategy"]
ROW, COL = "gene_encoder", "image_encoder"
KEY = [*GROUP, ROW, COL]

# Retrieval columns of the grid: label -> flat metric of the best checkpoint (hescape.evaluate.run).
RETRIEVAL = {
    "batch I2G": "test_best_batch_i2g_R_at_5",
    "batch G2I": "test_best_batch_g2i_R_at_5",
    "global I2G": "test_best_global_i2g_R_at_5",
    "global G2I": "test_best_global_g2i_R_at_5",
}
CHANCE = {"batch": "test_best_batch_i2g_chance_R_at_5", "global": "test_best_global_i2g_chance_R_at_5"}
LAST = {
    "last batch I2G": "test_last_batch_i2g_R_at_5",
    "last batch G2I": "test_last_batch_g2i_R_at_5",
    "last global I2G": "test_last_global_i2g_R_at_5",
    "last global G2I": "test_last_global_g2i_R_at_5",
}
KNOWN = ("oracle", "oracle_noisy", "random")


def collect_runs(experiment: str, *, client=None) -> pd.DataFrame:
    """One row per evaluated training run of ``experiment`` (tags, metrics), oldest first.

    Runs tagged ``hescape.kind=train`` that carry the headline evaluation metric; report runs and
    unevaluated runs are left out.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from hescape.errors import ConfigError
    from hescape.evaluate.run import HEADLINE

    client = client or MlflowClient(tracking.tracking_uri())
    mlflow.set_tracking_uri(tracking.tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"no MLflow experiment {experiment!r}; known: {', '.join(names) or 'none'}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'train'",
                              max_results=50000, order_by=["attributes.start_time ASC"])
    rows = []
    for run in runs:
        if HEADLINE not in run.data.metrics:
            continue
        tags = run.data.tags
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "panel": tags.get(tracking.TAG_PANEL, "?"),
            ROW: tags.get(tracking.TAG_GENE_ENCODER, "?"),
            COL: tags.get(tracking.TAG_IMAGE_ENCODER, "?"),
            "loss": tags.get(tracking.TAG_LOSS, "?"),
            "strategy": tags.get(tracking.TAG_STRATEGY, "?"),
            "seed": tags.get(tracking.TAG_SEED, "?"),
            **run.data.metrics,
        })
    return pd.DataFrame(rows)


def latest_per_seed(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the newest run of each (panel, loss, strategy, encoders, seed); return ``(kept, superseded)``.

    Seeds are what the grid averages over; two runs of one cell with the same seed are a rerun (or a
    variant the tags do not tell apart), and averaging them would count one seed twice.
    """
    if runs.empty:
        return runs, runs
    dup = runs.duplicated(subset=[*KEY, "seed"], keep="last")  # collect_runs lists oldest first
    return runs[~dup].reset_index(drop=True), runs[dup].reset_index(drop=True)


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """Evaluation metric columns (``test_*``) plus the training summary ones present."""
    return [c for c in runs.columns if c.startswith("test_") or c in ("best_val_loss", "best_epoch")]


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over seeds per (panel, loss, strategy, gene encoder, image encoder).

    Columns ``<metric>`` (mean), ``<metric>_std`` and ``n_seeds``.
    """
    cols = metric_columns(runs)
    grouped = runs.groupby(KEY, sort=True)
    mean = grouped[cols].mean()
    std = grouped[cols].std(ddof=1).add_suffix("_std")
    out = pd.concat([mean, std], axis=1)
    out["n_seeds"] = grouped.size()
    out["run_ids"] = grouped["run_id"].agg(lambda s: ",".join(s))
    return out.reset_index()


def pivot(agg: pd.DataFrame, metric: str) -> dict[tuple, pd.DataFrame]:
    """``{(panel, loss, strategy): gene encoder x image encoder table of metric (mean over seeds)}``."""
    out = {}
    for key, part in agg.groupby(GROUP, sort=True):
        if metric in part:
            out[key] = part.pivot_table(index=ROW, columns=COL, values=metric, aggfunc="mean")
    return out


def retrieval_grid(agg: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """Per (panel, loss, strategy): rows gene encoder, columns (image encoder, protocol/direction).

    The published within-batch R@5 and the global R@5 stand side by side for every encoder pair.
    """
    out = {}
    present = {label: col for label, col in RETRIEVAL.items() if col in agg}
    for key, part in agg.groupby(GROUP, sort=True):
        tables = {}
        for label, col in present.items():
            tables[label] = part.pivot_table(index=ROW, columns=COL, values=col, aggfunc="mean")
        if not tables:
            continue
        wide = pd.concat(tables, axis=1)  # columns: (label, image encoder)
        wide = wide.swaplevel(0, 1, axis=1)
        images = sorted({c[0] for c in wide.columns})
        wide = wide[[(img, label) for img in images for label in present if (img, label) in wide.columns]]
        out[key] = wide
    return out


def summary_table(agg: pd.DataFrame) -> pd.DataFrame:
    """One row per panel x loss x strategy x encoder pair: R@5 of the best and the last checkpoint in
    both protocols and directions (std over seeds where there are several seeds)."""
    cols = {**RETRIEVAL, **LAST}
    rows = []
    for _, r in agg.iterrows():
        row = {k: r[k] for k in KEY}
        row["seeds"] = int(r["n_seeds"])
        for label, col in cols.items():
            if col in r and _finite(r[col]):
                row[label] = r[col]
                std = r.get(f"{col}_std")
                if _finite(std):
                    row[f"{label} std"] = std
        rows.append(row)
    return pd.DataFrame(rows)


# Feature sets the evaluation scores, before (trunk) and after (aligned) alignment, in table order.
FEATURES = ("image_trunk", "image", "gene_trunk", "gene")


def _feature_suffix(name: str) -> tuple[str | None, str]:
    """``"mutation_image_trunk"`` -> ``("image_trunk", "mutation")``; longest feature name first."""
    for feat in sorted(FEATURES, key=len, reverse=True):
        if name == feat:
            return feat, ""
        if name.endswith(f"_{feat}"):
            return feat, name[: -len(feat) - 1]
    return None, name


def _probe_entry(col: str) -> tuple[str, str] | None:
    """``(metric label, feature set)`` of a flat best-checkpoint probe/batch column, else ``None``."""
    if not col.startswith("test_best_") or col.endswith("_std"):
        return None
    name = col.removeprefix("test_best_")
    if name.startswith("expr_") and name.endswith("_mean"):
        feat, _ = _feature_suffix(name.removeprefix("expr_").removesuffix("_mean"))
        return ("expression probe r (HVGs)", feat) if feat else None
    if name.startswith("slide_") and name.endswith("_auroc"):
        feat, label = _feature_suffix(name.removeprefix("slide_").removesuffix("_auroc"))
        return (f"slide AUROC {label}", feat) if feat else None
    if name.startswith("batchfx_"):
        feat, _, metric = name.removeprefix("batchfx_").partition(".")
        if feat in FEATURES and metric and metric != "n_cells":
            # MLflow names lost the "=" of "batch=donor.label=tissue.ilisi"; put it back for reading.
            *where, score = metric.split(".")
            where = [re.sub(r"^(batch|label)_", r"\1=", w) for w in where]
            return ".".join([*where, score]), feat
    return None


def _metric_order(metric: str) -> tuple[int, str]:
    """Probes first, then batch mixing, then label conservation."""
    rank = 0 if metric.startswith("expression") else 1 if metric.startswith("slide") else \
        2 if metric.startswith("batch=") else 3
    return rank, metric


def probe_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Probe and batch-effect scores, before vs after alignment: rows (run group, metric), columns
    the feature sets (``image_trunk``, ``image``, ``gene_trunk``, ``gene``); means over seeds."""
    entries = {c: e for c in agg.columns if (e := _probe_entry(c)) is not None}
    records = []
    for _, r in agg.iterrows():
        group = f"{r[ROW]}-{r[COL]} {r['loss']}/{r['strategy']} ({r['panel']})"
        for col, (metric, feat) in entries.items():
            if _finite(r[col]):
                records.append({"run group": group, "metric": metric, "features": feat, "value": float(r[col])})
    if not records:
        return pd.DataFrame()
    frame = pd.DataFrame(records)
    frame["order"] = frame["metric"].map(_metric_order)
    frame = frame.sort_values(["run group", "order"], kind="stable")
    table = frame.pivot_table(index=["run group", "metric"], columns="features", values="value", aggfunc="mean",
                              sort=False)
    return table[[f for f in FEATURES if f in table.columns]]


def known_answer_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Known-answer rows (oracle, noisy oracle, random) and chance, per panel, beside the best learned run.

    The oracles depend only on the panel's test split, so the first evaluated run of a panel gives them.
    """
    rows = []
    for panel, part in runs.groupby("panel", sort=True):
        first = part.iloc[0]
        for name in KNOWN:
            if f"test_{name}_global_i2g_R_at_5" not in part or not _finite(first.get(f"test_{name}_global_i2g_R_at_5")):
                continue
            rows.append(_known_row(panel, {"oracle": "oracle: composition (both modalities)",
                                           "oracle_noisy": "oracle: composition + noise",
                                           "random": "random embeddings"}[name], first, f"test_{name}"))
        score = part[[RETRIEVAL["global I2G"], RETRIEVAL["global G2I"]]].mean(axis=1)
        best = part.loc[score.idxmax()]
        rows.append(_known_row(panel, f"learned, best run ({best['run_name']})", best, "test_best"))
        rows.append({"panel": panel, "embedding": "chance",
                     "batch I2G": first.get(CHANCE["batch"]), "batch G2I": first.get(CHANCE["batch"]),
                     "global I2G": first.get(CHANCE["global"]), "global G2I": first.get(CHANCE["global"])})
    table = pd.DataFrame(rows)
    if not table.empty:
        chance = table[table["embedding"] == "chance"].set_index("panel")["global I2G"]
        table["global x chance"] = [
            0.5 * (r["global I2G"] + r["global G2I"]) / chance.get(r["panel"], np.nan) for _, r in table.iterrows()]
    return table


def _known_row(panel: str, label: str, row: pd.Series, prefix: str) -> dict:
    return {"panel": panel, "embedding": label,
            "batch I2G": row.get(f"{prefix}_batch_i2g_R_at_5"), "batch G2I": row.get(f"{prefix}_batch_g2i_R_at_5"),
            "global I2G": row.get(f"{prefix}_global_i2g_R_at_5"),
            "global G2I": row.get(f"{prefix}_global_g2i_R_at_5")}


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
