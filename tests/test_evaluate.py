"""Evaluation: ``hescape evaluate`` on a real (tiny) training run with a local MLflow SQLite store,
Ray-parallel embedding against in-process embedding, and the pieces the driver is built from.

One trained and evaluated run is shared with tests/test_report.py (``shared_run``), so the slow
part (preprocess, feature cache, training, evaluation) runs once per session.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

EXPERIMENT = "hescape-eval-test"


@dataclass
class SharedRun:
    root: Path
    run_id: str
    eval_dir: Path
    rc: int
    stdout: str


_SHARED: dict[str, SharedRun] = {}


@contextlib.contextmanager
def run_env(root: Path):
    """Work in ``root`` with its own MLflow store (what the conftest ``workdir`` fixture does, for a
    fixture that outlives one test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("HESCAPE_ARTIFACT_ROOT", str(root / "mlartifacts"))
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield root


def tiny_params(root: Path) -> dict:
    return {
        "preprocess": {"image_size": 32, "out_dir": str(root / "shards")},
        "train": {"epochs": 3, "batch_size": 32, "lr": 1e-3, "warmup_steps": 2, "cache_dir": str(root / "cache"),
                  "storage_path": str(root / "ray"), "experiment": EXPERIMENT},
    }


def shared_run(tmp_path_factory, panel_dir: Path, capsys=None) -> SharedRun:
    """Train once (in-process) and evaluate once through the CLI with 2 Ray embedding workers."""
    if "run" in _SHARED:
        return _SHARED["run"]
    from hescape.cli import main
    from hescape.train.run import train_run

    root = tmp_path_factory.mktemp("evaluated-run")
    with run_env(root):
        run_id = train_run(panel_dir, tiny_params(root), local=True, progress=False)
        eval_dir = root / "eval"
        if capsys is not None:
            capsys.readouterr()
        rc = main(["evaluate", "--run", run_id, "--out", str(eval_dir), "--workers", "2",
                   "--set", "evaluate.bootstrap=50", "--set", "evaluate.max_batch_cells=400"])
        stdout = capsys.readouterr().out if capsys is not None else ""
    _SHARED["run"] = SharedRun(root=root, run_id=run_id, eval_dir=eval_dir, rc=rc, stdout=stdout)
    return _SHARED["run"]


@pytest.fixture
def evaluated(tmp_path_factory, tiny_panel_dir, ray_session, capsys):
    run = shared_run(tmp_path_factory, tiny_panel_dir, capsys)
    with run_env(run.root):
        yield run


def _client():
    from mlflow.tracking import MlflowClient

    from hescape.tracking import tracking_uri

    return MlflowClient(tracking_uri())


def _in_unit(x) -> bool:
    return x is not None and 0.0 <= x <= 1.0


#  End to end


@pytest.mark.slow
def test_evaluate_writes_metrics_and_logs_them(evaluated):
    from hescape.evaluate.run import EMBEDDINGS_FILE, HEADLINE, METRICS_FILE, TAG_EVALUATED

    assert evaluated.rc == 0
    assert "global R@5" in evaluated.stdout and "check oracle composition" in evaluated.stdout
    m = json.loads((evaluated.eval_dir / METRICS_FILE).read_text())
    assert m["run_id"] == evaluated.run_id and m["panel"] == "tiny"
    n_test = m["n_spots"]["test"]
    assert set(m["checkpoints"]) == {"best", "last"}
    for which, res in m["checkpoints"].items():
        assert res["n_workers"] == 2 or res.get("same_as")
        for protocol in ("batch", "global"):
            for direction in ("I2G", "G2I"):
                r = res["retrieval"][protocol][direction]
                assert all(_in_unit(r[f"R@{k}"]) for k in (1, 5, 10)), (which, protocol, direction, r)
                assert r["R@1"] <= r["R@5"] <= r["R@10"]
                assert r["mean_rank"] >= 1
        assert res["retrieval"]["global"]["I2G"]["chance_R@5"] == pytest.approx(5 / n_test)
        assert res["retrieval"]["batch"]["I2G"]["n_batches"] == -(-n_test // 64)
        assert len(res["curves"]["global"]["I2G"]) == 50 and len(res["curves"]["batch"]["G2I"]) == 50
        # R@5 of the curve is the R@5 of the summary: one ranking, two views.
        assert res["curves"]["global"]["I2G"][4] == pytest.approx(res["retrieval"]["global"]["I2G"]["R@5"])
        expr = res["expression_probe"]
        assert len(expr["genes"]) == 40  # the tiny panel has 40 genes; hvg = min(50, 40)
        for feats in ("image_trunk", "image"):
            assert -1.0 <= expr[feats]["mean"] <= 1.0
        slide = res["slide_probe"]["mutation"]
        assert set(slide) == {"image_trunk", "image", "gene_trunk", "gene"}
        for probe in slide.values():
            assert probe["n_samples"] == 6 and (probe["auroc"] is None or _in_unit(probe["auroc"]))
        batch = res["batch_metrics"]
        assert batch["n_spots"] == 400 and set(batch["splits"]) == {"train", "val", "test"}
        assert batch["metrics"], "batch metrics are empty"
    best = m["checkpoints"]["best"]
    assert best["epoch"] == best["train_metrics"]["epoch"]
    known = m["known_answer"]
    assert known["oracle"]["global"]["I2G"]["R@5"] > 0.9
    assert {c["check"] for c in m["checks"]} == {"oracle composition", "random embeddings",
                                                 "learned (best checkpoint)"}
    assert next(c for c in m["checks"] if c["check"] == "oracle composition")["passed"]

    # Every flat metric reached the run, under the same names and values.
    flat = m["flat"]
    assert HEADLINE in flat and "test_last_global_g2i_R_at_5" in flat and "test_oracle_global_i2g_R_at_5" in flat
    assert any(k.startswith("test_best_expr_") for k in flat) and any(k.startswith("test_best_slide_") for k in flat)
    assert any(k.startswith("test_best_batchfx_") for k in flat)
    run = _client().get_run(evaluated.run_id)
    logged = run.data.metrics
    missing = sorted(set(flat) - set(logged))
    assert not missing, missing[:10]
    assert all(logged[k] == pytest.approx(v) for k, v in flat.items())
    assert run.data.tags[TAG_EVALUATED] == "best,last"
    artifacts = {a.path for a in _client().list_artifacts(evaluated.run_id, "evaluation")}
    assert artifacts == {f"evaluation/{METRICS_FILE}", f"evaluation/{EMBEDDINGS_FILE}"}
    with np.load(evaluated.eval_dir / EMBEDDINGS_FILE, allow_pickle=False) as npz:
        assert npz["best_image"].shape == (n_test, 128) and npz["last_gene"].shape == (n_test, 128)
        assert len(npz["obs_donor"]) == n_test


@pytest.mark.slow
def test_ray_embedding_equals_in_process(evaluated):
    from hescape.evaluate.embed import embed_local, embed_with_ray
    from hescape.train.run import download_checkpoint

    ckpt = download_checkpoint(evaluated.run_id, "best", evaluated.root / "ckpt")
    local = embed_local(ckpt, "test")
    parallel = embed_with_ray(ckpt, "test", 2, batch_size=50)  # chunk and batch edges differ from local
    for name in ("image", "gene", "image_trunk", "gene_trunk"):
        np.testing.assert_allclose(getattr(parallel, name), getattr(local, name), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    one = embed_with_ray(ckpt, "test", 1)  # in-process path
    np.testing.assert_array_equal(one.image, local.image)


def test_evaluate_fails_cleanly_on_a_missing_run(workdir, capsys):
    from hescape.cli import main

    rc = main(["evaluate", "--run", "0" * 32, "--out", str(workdir / "nowhere")])
    assert rc == 2
    assert "no MLflow run" in capsys.readouterr().err
    assert not (workdir / "nowhere").exists()


#  Pieces


def test_chunk_ranges_cover_rows_in_order():
    from hescape.evaluate.embed import chunk_ranges

    assert chunk_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_ranges(2, 5) == [(0, 1), (1, 2)]
    assert chunk_ranges(0, 4) == [(0, 0)]
    for n in (1, 7, 64, 1001):
        for k in (1, 2, 3, 16):
            ranges = chunk_ranges(n, k)
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_known_answers_on_a_synthetic_composition():
    from hescape.evaluate.known_answer import checks, known_answer_retrieval

    comp = np.random.default_rng(0).dirichlet(np.full(6, 0.5), size=500)
    known = known_answer_retrieval(comp, noise=1.0, seed=0)
    assert known["oracle"]["global"]["I2G"]["R@5"] == pytest.approx(1.0)
    assert known["oracle"]["batch"]["G2I"]["R@1"] == pytest.approx(1.0)
    noisy, rand = known["oracle_noisy"]["global"]["I2G"]["R@5"], known["random"]["global"]["I2G"]["R@5"]
    assert rand < noisy < 1.0
    result = {c["check"]: c for c in checks(known, known["random"])}
    assert result["oracle composition"]["passed"] and result["oracle composition"]["ratio"] > 50
    assert not result["learned (best checkpoint)"]["passed"]  # random "learning" fails the 3x bar


def test_flat_metric_names_are_mlflow_safe():
    from hescape.evaluate.run import flat_metrics, metric_key

    assert metric_key("test_best", "R@5") == "test_best_R_at_5"
    assert metric_key("a:b", "c") == "a_b_c"
    r = {"I2G": {"R@5": 0.5, "chance_R@5": 0.1}, "G2I": {"R@5": 0.25, "chance_R@5": 0.1}}
    result = {"checkpoints": {"best": {"retrieval": {"batch": r, "global": r}, "epoch": 2,
                                       "expression_probe": {"image": {"mean": 0.3, "std": 0.1}, "genes": ["a"]},
                                       "slide_probe": {"mutation": {"image": {"auroc": None, "ci_low": 0.2}}},
                                       "batch_metrics": {"metrics": {"image/iLISI": 0.4}}}},
              "known_answer": {"oracle": {"batch": r, "global": r}, "noise": 1.0}}
    flat = flat_metrics(result)
    assert flat["test_best_global_i2g_R_at_5"] == 0.5 and flat["test_best_batch_g2i_chance_R_at_5"] == 0.1
    assert flat["test_best_expr_image_mean"] == 0.3 and flat["test_best_epoch"] == 2.0
    assert "test_best_slide_mutation_image_auroc" not in flat  # undefined AUROC is not logged as a number
    assert flat["test_best_slide_mutation_image_ci_low"] == 0.2
    assert flat["test_best_batchfx_image/iLISI"] == 0.4
    assert flat["test_oracle_global_i2g_R_at_5"] == 0.5


def test_evaluate_config_from_params():
    from hescape.config import apply_overrides, section
    from hescape.errors import ConfigError
    from hescape.evaluate.run import EvaluateConfig

    cfg = section(apply_overrides({}, ["evaluate.checkpoints=[last]", "evaluate.n_workers=4"]), "evaluate",
                  EvaluateConfig)
    assert cfg.checkpoints == ["last"] and cfg.n_workers == 4 and cfg.batch_size == 64
    with pytest.raises(ConfigError, match="checkpoints"):
        section({"evaluate": {"checkpoints": ["final"]}}, "evaluate", EvaluateConfig)
    with pytest.raises(ConfigError, match="unknown key"):
        section({"evaluate": {"batchsize": 3}}, "evaluate", EvaluateConfig)


def test_stratified_subsample_keeps_every_sample():
    import pandas as pd

    from hescape.evaluate.run import stratified_subsample

    obs = pd.DataFrame({"sample_id": np.repeat(["a", "b", "c"], [500, 300, 10])})
    idx = stratified_subsample(obs, 100, seed=0)
    assert np.all(np.diff(idx) > 0)
    counts = obs.iloc[idx]["sample_id"].value_counts()
    assert set(counts.index) == {"a", "b", "c"} and abs(len(idx) - 100) <= 3
    assert np.array_equal(stratified_subsample(obs, 10_000, seed=0), np.arange(len(obs)))


def test_no_mlflow_env_leaks():
    # The shared run's MLflow store must not leak into later tests through the environment.
    assert "evaluated-run" not in os.environ.get("MLFLOW_TRACKING_URI", "")
