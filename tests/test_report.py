"""``hescape report`` on a real MLflow experiment (the evaluated run shared with test_evaluate.py plus
a second, logged-only run so the grid has two rows), and the grid/rendering pieces on their own."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_evaluate import EXPERIMENT, run_env, shared_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def evaluated(tmp_path_factory, tiny_panel_dir, ray_session, capsys):
    run = shared_run(tmp_path_factory, tiny_panel_dir, capsys)
    with run_env(run.root):
        yield run


def _client():
    from mlflow.tracking import MlflowClient

    from hescape.tracking import tracking_uri

    return MlflowClient(tracking_uri())


def _add_logged_run(client, source_run_id: str, *, gene_encoder: str, scale: float, with_metrics: bool = True) -> str:
    """A training run that exists only as MLflow metadata: the real run's tags and evaluation
    metrics (scaled), no artifacts. The report must still place it in the grid."""
    from mlflow.entities import Metric

    from hescape import tracking

    source = client.get_run(source_run_id)
    tags = {k: v for k, v in source.data.tags.items() if k.startswith("hescape.")}
    tags[tracking.TAG_GENE_ENCODER] = gene_encoder
    run = client.create_run(source.info.experiment_id, run_name=f"{gene_encoder}-logged", tags=tags)
    if with_metrics:
        now = int(time.time() * 1000)
        metrics = [Metric(k, v * scale if "R_at" in k and "chance" not in k else v, now, 0)
                   for k, v in source.data.metrics.items() if k.startswith("test_")]
        client.log_batch(run.info.run_id, metrics=metrics)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.mark.slow
def test_report_builds_grid_figures_pages_and_a_report_run(evaluated, capsys):
    from hescape import tracking
    from hescape.cli import main

    assert evaluated.rc == 0
    client = _client()
    logged = _add_logged_run(client, evaluated.run_id, gene_encoder="drvi", scale=0.5)
    unevaluated = _add_logged_run(client, evaluated.run_id, gene_encoder="nicheformer", scale=1, with_metrics=False)
    out = evaluated.root / "report"
    capsys.readouterr()
    rc = main(["report", "--experiment", EXPERIMENT, "--out", str(out), "--projection", "umap"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert str(out / "report.html") in printed

    names = {p.name for p in (out / "figures").iterdir()}
    assert {"grid_heatmap.png", "recall_at_k.png", "training_curves.png",
            f"embeddings_{evaluated.run_id[:8]}.png"} <= names
    assert all((out / "figures" / n).read_bytes()[:8] == PNG_MAGIC for n in names)

    grid = pd.read_csv(out / "grid.csv")
    assert sorted(grid["gene_encoder"]) == ["drvi", "mlp"]
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs["run_id"]) == {evaluated.run_id, logged}
    assert unevaluated not in set(runs["run_id"])
    mlp = grid.set_index("gene_encoder").loc["mlp"]
    real = client.get_run(evaluated.run_id).data.metrics
    assert mlp["test_best_global_i2g_R_at_5"] == pytest.approx(real["test_best_global_i2g_R_at_5"])

    md = (out / "report.md").read_text()
    for needle in ("Known-answer checks", "oracle: composition", "random embeddings", "chance",
                   "batch I2G", "global G2I", "efficientnet_lite0 batch I2G", "| mlp |", "| drvi |",
                   "slide AUROC mutation", "expression probe r", "ilisi", "PASS",
                   "figures/recall_at_k.png", "Training curves"):
        assert needle in md, needle
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(names)
    assert "src='figures" not in html and "<link" not in html and "<script" not in html  # self-contained
    assert "<style>" in html

    reports = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                 filter_string=f"tags.`{tracking.TAG_KIND}` = 'report'")
    assert len(reports) == 1 and reports[0].info.status == "FINISHED"
    assert reports[0].info.run_id in printed
    artifacts = {a.path for a in client.list_artifacts(reports[0].info.run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/grid.csv", "report/figures"} <= artifacts


def test_report_of_an_unknown_experiment_is_a_clear_error(workdir, capsys):
    from hescape.cli import main

    rc = main(["report", "--experiment", "no-such-experiment", "--out", str(workdir / "r")])
    assert rc == 2
    assert "no MLflow experiment 'no-such-experiment'" in capsys.readouterr().err


#  Pieces


def _runs_frame() -> pd.DataFrame:
    rows = []
    for gene, base in (("mlp", 0.2), ("drvi", 0.4)):
        for image, bump in (("uni", 0.0), ("conch", 0.05)):
            for seed, noise in ((1, -0.01), (2, 0.01)):
                value = base + bump + noise
                rows.append({"run_id": f"{gene}{image}{seed}", "run_name": f"{gene}-{image}-s{seed}",
                             "panel": "p", "gene_encoder": gene, "image_encoder": image, "loss": "clip",
                             "strategy": "frozen", "seed": str(seed),
                             "test_best_batch_i2g_R_at_5": value, "test_best_batch_g2i_R_at_5": value,
                             "test_best_global_i2g_R_at_5": value / 10, "test_best_global_g2i_R_at_5": value / 10,
                             "test_best_expr_image_trunk_mean": 0.3, "test_best_expr_image_mean": 0.25,
                             "test_best_slide_mutation_gene_trunk_auroc": 0.6,
                             "test_best_batchfx_image.batch_donor.ilisi": 0.1,
                             "test_best_batchfx_image.n_cells": 100.0})
    return pd.DataFrame(rows)


def test_grid_averages_seeds_and_pivots_gene_by_image():
    from hescape.report import grid

    agg = grid.aggregate(_runs_frame())
    assert len(agg) == 4 and set(agg["n_seeds"]) == {2}
    row = agg[(agg["gene_encoder"] == "drvi") & (agg["image_encoder"] == "conch")].iloc[0]
    assert row["test_best_batch_i2g_R_at_5"] == pytest.approx(0.45)
    assert row["test_best_batch_i2g_R_at_5_std"] == pytest.approx(np.std([0.44, 0.46], ddof=1))
    table = grid.pivot(agg, "test_best_batch_i2g_R_at_5")[("p", "clip", "frozen")]
    assert list(table.index) == ["drvi", "mlp"] and list(table.columns) == ["conch", "uni"]
    assert table.loc["mlp", "uni"] == pytest.approx(0.2)
    wide = grid.retrieval_grid(agg)[("p", "clip", "frozen")]
    assert list(wide.columns)[:4] == [("conch", "batch I2G"), ("conch", "batch G2I"), ("conch", "global I2G"),
                                      ("conch", "global G2I")]
    assert wide.loc["drvi", ("uni", "global G2I")] == pytest.approx(0.04)


def test_probe_table_reads_feature_sets_from_metric_names():
    from hescape.report import grid

    table = grid.probe_table(grid.aggregate(_runs_frame()))
    assert list(table.columns) == ["image_trunk", "image", "gene_trunk"]
    group = "mlp-uni clip/frozen (p)"
    assert table.loc[(group, "expression probe r (HVGs)"), "image_trunk"] == pytest.approx(0.3)
    assert table.loc[(group, "expression probe r (HVGs)"), "image"] == pytest.approx(0.25)
    assert table.loc[(group, "slide AUROC mutation"), "gene_trunk"] == pytest.approx(0.6)
    assert table.loc[(group, "batch=donor.ilisi"), "image"] == pytest.approx(0.1)
    assert next(m for g, m in table.index if g == group) == "expression probe r (HVGs)"  # probes first
    assert not any("n_cells" in m for _, m in table.index)


def test_markdown_and_self_contained_html(tmp_path):
    from hescape.report.html import Figure, Heading, Table, Text, markdown_table, render_html, render_markdown

    frame = pd.DataFrame({"seeds": [3, 1], "R@5": [0.12345, float("nan")], "name": ["a|b", "c"]},
                         index=pd.Index(["mlp", "drvi"], name="gene"))
    md = markdown_table(frame)
    assert md.splitlines()[0] == "| gene | seeds | R@5 | name |"
    assert "| mlp | 3 | 0.123 | a\\|b |" in md and "| drvi | 1 | – | c |" in md
    png = tmp_path / "figures" / "x.png"
    png.parent.mkdir()
    png.write_bytes(PNG_MAGIC + b"tiny")
    blocks = [Heading("Grid"), Text("note <b>"), Table(frame, caption="cap"), Figure(png, "fig")]
    page = render_html("T", blocks)
    assert "data:image/png;base64," in page and "figures/x.png" not in page
    assert "note &lt;b&gt;" in page and "<th>mlp</th>" in page
    doc = render_markdown("T", blocks, base=tmp_path)
    assert "![fig](figures/x.png)" in doc and doc.startswith("# T")


def test_figures_write_pngs(tmp_path):
    from hescape.report import figures

    rng = np.random.default_rng(0)
    img, gene = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
    used = figures.embedding_map(img, gene, {"donor": np.repeat(["d0", "d1"], 30)}, tmp_path / "m.png",
                                 title="t", method="pca")
    assert used == "pca"
    curves = {"run": {"global": {"I2G": [0.1, 0.2], "G2I": [0.1, 0.3]}, "batch": {"I2G": [0.2], "G2I": [0.3]}}}
    figures.recall_curves(curves, tmp_path / "c.png", chance_n={"global": 60, "batch": 64})
    figures.training_curves({"run": {"val_loss": [(0, 2.0), (1, 1.5)]}}, tmp_path / "t.png")
    table = pd.DataFrame([[0.1, 0.2]], index=["mlp"], columns=["uni", "conch"])
    figures.grid_heatmap({("p", "clip", "frozen"): table}, tmp_path / "h.png", title="h")
    for name in ("m", "c", "t", "h"):
        assert Path(tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


def test_a_rerun_supersedes_the_older_run_of_the_same_seed():
    from hescape.report import grid

    runs = _runs_frame()
    rerun = runs.iloc[[0]].assign(run_id="rerun", test_best_batch_i2g_R_at_5=0.9)
    kept, superseded = grid.latest_per_seed(pd.concat([runs, rerun], ignore_index=True))
    assert list(superseded["run_id"]) == [runs.iloc[0]["run_id"]]
    assert "rerun" in set(kept["run_id"]) and len(kept) == len(runs)
