"""``hescape report``: the benchmark report of an MLflow experiment.

From every evaluated training run of the experiment (``hescape evaluate`` metrics and its
``evaluation/metrics.json`` and ``evaluation/embeddings_test.npz`` artifacts) it builds, in one
output folder:

- ``grid.csv`` (one row per panel x loss x strategy x gene encoder x image encoder: every metric,
  mean and std over seeds) and ``runs.csv`` (one row per run);
- ``figures/*.png``: grid heatmaps, Recall@k curves, training curves, 2-D maps (UMAP) of the test
  embeddings coloured by donor and by tissue;
- ``report.md`` (Markdown tables, figures linked) and ``report.html`` (self-contained);

and logs the folder as the artifacts of a new run tagged ``hescape.kind=report`` in the experiment.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hescape import tracking
from hescape.errors import ConfigError, DataError
from hescape.io import atomic_dir, atomic_file
from hescape.report import figures, grid
from hescape.report.html import Figure, Heading, Table, Text, render_html, render_markdown

log = logging.getLogger(__name__)


@dataclass
class ReportConfig:
    """Options of ``hescape report`` (the ``report`` block of params.yaml, if any).

    Attributes
    ----------
    projection
        ``umap`` or ``pca`` for the embedding maps (UMAP falls back to PCA, with a note, if it fails).
    max_points
        Test spots per modality drawn in a map (seeded subsample).
    max_map_runs
        Maps are drawn for this many runs, best global R@5 first.
    seed
        Seed of subsamples and of UMAP.
    """

    projection: str = "umap"
    max_points: int = 2000
    max_map_runs: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.projection not in ("umap", "pca"):
            raise ConfigError(f"report.projection: {self.projection!r}; choose umap or pca")


@dataclass
class ReportResult:
    out_dir: Path
    report_run_id: str | None
    n_runs: int
    notes: list[str]


def _download(run_id: str, artifact: str, dst: Path) -> Path | None:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst)))
    except Exception as exc:  # noqa: BLE001 - a run evaluated without the artifact still has its metrics
        log.warning("run %s: no artifact %s (%s)", run_id, artifact, exc)
        return None


def _history(client, run_id: str, keys=("train_loss_epoch", "val_loss", "val_R_at_5")) -> dict:
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


def build_report(experiment: str, out_dir: str | Path, cfg: ReportConfig | None = None, *,
                 log_to_mlflow: bool = True) -> ReportResult:
    """Build the report of ``experiment`` into ``out_dir`` (replaced atomically); see the module doc."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from hescape.evaluate.run import ARTIFACT_DIR, EMBEDDINGS_FILE, METRICS_FILE

    cfg = cfg or ReportConfig()
    out_dir = Path(out_dir)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = MlflowClient(tracking.tracking_uri())
    runs = grid.collect_runs(experiment, client=client)
    if runs.empty:
        raise DataError(f"experiment {experiment!r} has no evaluated training runs; run `hescape evaluate --run ID`")
    runs, superseded = grid.latest_per_seed(runs)
    runs["label"] = runs["run_name"].fillna(runs["run_id"].str[:8])
    runs["global_R_at_5"] = runs[[grid.RETRIEVAL["global I2G"], grid.RETRIEVAL["global G2I"]]].mean(axis=1)
    runs["batch_R_at_5"] = runs[[grid.RETRIEVAL["batch I2G"], grid.RETRIEVAL["batch G2I"]]].mean(axis=1)
    agg = grid.aggregate(runs)
    notes: list[str] = [f"run {r['run_id']} ({r['run_name']}) left out: a newer run has the same panel, encoders, "
                        f"loss, strategy and seed {r['seed']}" for _, r in superseded.iterrows()]

    with tempfile.TemporaryDirectory(prefix="hescape-report-") as tmp, atomic_dir(out_dir, overwrite=True) as work:
        tmp = Path(tmp)
        fig_dir = work / "figures"
        evaluated = {}
        for run_id in runs["run_id"]:
            path = _download(run_id, f"{ARTIFACT_DIR}/{METRICS_FILE}", tmp / run_id)
            if path is not None:
                evaluated[run_id] = json.loads(path.read_text())
        blocks: list = []
        panels = ", ".join(sorted(runs["panel"].unique()))
        blocks.append(Text(f"{len(runs)} evaluated training runs ({len(agg)} encoder pair x loss x strategy "
                           f"groups) of MLflow experiment `{experiment}`, panel(s) {panels}; generated "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Retrieval is Recall@5 of the best checkpoint "
                           "(the epoch each run selected by its monitored validation metric, `train.monitor`) on the "
                           "whole test split, mean over seeds. `batch` is the "
                           "published protocol (consecutive mini-batches of 64 test pairs, dataset order); "
                           "`global` ranks every test pair against all others (harder; chance 5/N)."))

        # Known-answer checks, next to the learned results.
        blocks.append(Heading("Known-answer checks"))
        known = grid.known_answer_table(runs)
        if not known.empty:
            known["global x chance"] = known["global x chance"].map(lambda v: f"{v:.1f}x")
            blocks.append(Table(known.set_index(["panel", "embedding"]),
                                caption="Recall@5 of oracle embeddings (the simulator's true cell-type composition "
                                        "used for both modalities; with independent noise), random embeddings, the "
                                        "best learned run, and chance, on the same test split"))
        check_rows = [{"panel": r["panel"], "run": r["label"], **c} for _, r in runs.iterrows()
                      for c in evaluated.get(r["run_id"], {}).get("checks", [])]
        if check_rows:
            checks = pd.DataFrame(check_rows).drop_duplicates(subset=["panel", "check", "ratio"]).reset_index(drop=True)
            checks["passed"] = checks["passed"].map({True: "PASS", False: "FAIL"})
            checks = checks.rename(columns={"ratio": "x chance"})
            blocks.append(Table(checks[["panel", "run", "check", "statement", "x chance", "passed"]], digits=1,
                                caption="Checks: statement, measured multiple of chance (global R@5, I2G and G2I "
                                        "averaged), verdict"))
        else:
            blocks.append(Text("No known-answer data (the panels carry no ground-truth composition)."))

        # The grid.
        blocks.append(Heading("Benchmark grid: Recall@5, published protocol vs whole test split"))
        for key, table in grid.retrieval_grid(agg).items():
            part = runs[(runs["panel"] == key[0]) & (runs["loss"] == key[1]) & (runs["strategy"] == key[2])]
            chance_b = part[grid.CHANCE["batch"]].mean() if grid.CHANCE["batch"] in part else float("nan")
            chance_g = part[grid.CHANCE["global"]].mean() if grid.CHANCE["global"] in part else float("nan")
            blocks.append(Table(table, caption=f"panel {key[0]}, loss {key[1]}, strategy {key[2]}: rows gene "
                                               f"encoder, columns image encoder x protocol/direction (chance: "
                                               f"batch {chance_b:.3f}, global {chance_g:.4f})"))
        heat = {}
        for label, col in (("global", "global_R_at_5"), ("batch", "batch_R_at_5")):
            agg_col = runs.groupby(grid.KEY)[col].mean().rename(col).reset_index()
            for key, table in grid.pivot(agg_col, col).items():
                heat[(*key, label)] = table
        if heat:
            path = figures.grid_heatmap(heat, fig_dir / "grid_heatmap.png",
                                        title="Recall@5 (mean of I2G and G2I), best checkpoint, by protocol")
            blocks.append(Figure(path, "Grid heatmaps: gene encoder x image encoder, per panel / loss / strategy "
                                       "/ protocol"))
        summary = grid.summary_table(agg)
        blocks.append(Heading("All runs: best and last checkpoint"))
        blocks.append(Table(summary.set_index(grid.KEY),
                            caption="R@5 per protocol and direction for the best checkpoint (by the run's "
                                    "train.monitor) and for the last one (std over seeds where there are several)"))

        probes = grid.probe_table(agg)
        if not probes.empty:
            blocks.append(Heading("Probes and batch effects: before vs after alignment"))
            blocks.append(Text("`image_trunk` / `gene_trunk`: the encoders' own features before alignment; "
                               "`image` / `gene`: the aligned 128-d embeddings. Expression probe: Pearson r of a ridge "
                               "regression (train split -> test split) averaged over the most variable genes. Slide "
                               "probe: AUROC of a sample-level label from per-sample pooled embeddings, donor-grouped "
                               "folds. Batch metrics: mixing of samples/donors vs conservation of tissue/cell type."))
            blocks.append(Table(probes, caption="Best checkpoint, mean over seeds; columns: the features scored "
                                                "(trunk = before alignment)"))

        # Curves.
        blocks.append(Heading("Recall@k curves"))
        curves, chance_n = {}, {}
        for _, r in runs.iterrows():
            res = evaluated.get(r["run_id"], {}).get("checkpoints", {}).get("best")
            if res and res.get("curves"):
                curves[r["label"]] = res["curves"]
                chance_n.setdefault("global", evaluated[r["run_id"]]["n_spots"]["test"])
                chance_n.setdefault("batch", evaluated[r["run_id"]]["config"]["batch_size"])
        if curves:
            path = figures.recall_curves(curves, fig_dir / "recall_at_k.png", chance_n=chance_n)
            blocks.append(Figure(path, "Recall@k of the best checkpoints, k = 1..50 (batch protocol: up to the batch "
                                       "size); dashed: chance"))
        else:
            notes.append("no Recall@k curves (runs lack evaluation/metrics.json)")

        blocks.append(Heading("Training curves"))
        histories = {r["label"]: _history(client, r["run_id"]) for _, r in runs.iterrows()}
        path = figures.training_curves(histories, fig_dir / "training_curves.png")
        blocks.append(Figure(path, "Training loss, validation loss and validation global R@5 per epoch"))

        blocks.append(Heading("Test embeddings"))
        best_first = runs.sort_values("global_R_at_5", ascending=False).head(cfg.max_map_runs)
        for _, r in best_first.iterrows():
            npz_path = _download(r["run_id"], f"{ARTIFACT_DIR}/{EMBEDDINGS_FILE}", tmp / r["run_id"])
            if npz_path is None:
                continue
            with np.load(npz_path, allow_pickle=False) as npz:
                colour_by = {name: npz[f"obs_{name}"] for name in ("donor", "tissue") if f"obs_{name}" in npz}
                if "best_image" not in npz or not colour_by:
                    continue
                fname = f"embeddings_{r['run_id'][:8]}.png"
                used = figures.embedding_map(npz["best_image"], npz["best_gene"], colour_by, fig_dir / fname,
                                             title=r["label"], method=cfg.projection, max_points=cfg.max_points,
                                             seed=cfg.seed)
            if used != cfg.projection:
                notes.append(f"{r['label']}: UMAP unavailable, map drawn with PCA")
            blocks.append(Figure(fig_dir / fname, f"{r['label']}: joint {used.upper()} of the test image and gene "
                                                  "embeddings (top: image, bottom: gene; grey: the other modality), "
                                                  "coloured by donor and by tissue"))
        if notes:
            blocks.append(Heading("Notes"))
            blocks.extend(Text(n) for n in notes)

        title = f"HESCAPE benchmark report: {experiment}"
        agg.to_csv(work / "grid.csv", index=False)
        runs.drop(columns=["label"]).to_csv(work / "runs.csv", index=False)
        with atomic_file(work / "report.md") as fh:
            fh.write(render_markdown(title, blocks, base=work))
        with atomic_file(work / "report.html") as fh:
            fh.write(render_html(title, blocks))
        with atomic_file(work / "report_config.json") as fh:
            json.dump({"experiment": experiment, "config": asdict(cfg), "runs": runs["run_id"].tolist()}, fh, indent=2)

    report_run_id = _log_report(client, experiment, out_dir, runs) if log_to_mlflow else None
    return ReportResult(out_dir=out_dir, report_run_id=report_run_id, n_runs=len(runs), notes=notes)


def _log_report(client, experiment: str, out_dir: Path, runs: pd.DataFrame) -> str:
    from mlflow.entities import Metric, Param

    exp = client.get_experiment_by_name(experiment)
    run = client.create_run(exp.experiment_id, run_name=f"report-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={tracking.TAG_KIND: "report"})
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        best = runs.loc[runs["global_R_at_5"].idxmax()]
        client.log_batch(run_id, params=[Param("n_runs", str(len(runs))), Param("best_run", best["run_id"])],
                         metrics=[Metric("best_global_R_at_5", float(best["global_R_at_5"]), now, 0),
                                  Metric("best_batch_R_at_5", float(best["batch_R_at_5"]), now, 0)])
        client.log_artifacts(run_id, str(out_dir), artifact_path="report")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id
