"""Training: the loop, the feature cache, MLflow tracking, checkpoints, Ray Train workers and
resuming after a killed worker. Real parts throughout: a local Ray cluster, an MLflow SQLite store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hescape.config import apply_overrides
from hescape.data.shards import PreprocessConfig, Shards, build_shards
from hescape.train.config import TrainConfig
from hescape.train.loop import run_local, warmup_cosine


def base_params(tmp: Path, **train) -> dict:
    return {
        "preprocess": {"image_size": 32, "out_dir": str(tmp / "shards")},
        "train": {"epochs": 3, "batch_size": 32, "lr": 1e-3, "warmup_steps": 2, "num_workers": 2,
                  "cpus_per_worker": 0.5, "cache_dir": str(tmp / "cache"), "storage_path": str(tmp / "ray"),
                  "max_failures": 2, **train},
    }


def mlflow_client():
    from mlflow.tracking import MlflowClient

    from hescape.tracking import tracking_uri

    return MlflowClient(tracking_uri())


def history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_warmup_cosine_schedule():
    f = warmup_cosine(4, 14)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.5)
    assert f(14) == pytest.approx(0.0, abs=1e-12)
    assert f(100) == pytest.approx(0.0, abs=1e-12)


def test_overrides_reach_the_typed_config():
    from hescape.config import section
    from hescape.errors import ConfigError

    params = apply_overrides({"train": {"lr": 1e-3}}, ["train.loss=siglip", "train.epochs=4", "train.lr=3e-4"])
    cfg = section(params, "train", TrainConfig)
    assert (cfg.loss, cfg.epochs, cfg.lr) == ("siglip", 4, 3e-4)
    with pytest.raises(ConfigError, match="unknown key"):
        section(apply_overrides(params, ["train.learning_rate=1"]), "train", TrainConfig)
    with pytest.raises(ConfigError, match="expected an integer"):
        section(apply_overrides(params, ["train.epochs=three"]), "train", TrainConfig)
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(params, ["train.epochs"])


def test_local_run_tracks_everything(tiny_panel_dir, workdir):
    from hescape.train.checkpoint import embed_split, load_trained
    from hescape.train.run import download_checkpoint, train_run

    run_id = train_run(tiny_panel_dir, base_params(workdir), local=True, progress=False)
    client = mlflow_client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["hescape.image_encoder"] == "efficientnet_lite0"
    assert run.data.tags["hescape.gene_encoder"] == "mlp"
    assert run.data.tags["hescape.loss"] == "clip" and run.data.tags["hescape.strategy"] == "frozen"
    assert run.data.tags["hescape.seed"] == "42"
    assert len(run.data.tags["hescape.panel_hash"]) == 16
    assert run.data.tags["hescape.git_commit"]  # the code's commit, wherever the run is started
    assert run.data.params["train.lr"] == "0.001" and run.data.params["preprocess.image_size"] == "32"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "hescape/tiny"
    val = history(client, run_id, "val_loss")
    assert len(val) == 3 and all(np.isfinite(val))
    assert len(history(client, run_id, "train_loss")) > 0  # per-step metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoints", "config", "panel"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "panel")} == {"panel/panel.json", "panel/manifest.json"}
    resolved = json.loads(Path(client.download_artifacts(run_id, "config/resolved_config.json")).read_text())
    assert resolved["train"]["lr"] == 1e-3 and resolved["spec"]["image_feature_dim"] == 1280

    best = download_checkpoint(run_id, "best")
    info = json.loads((best / "checkpoint.json").read_text())
    assert info["metrics"]["val_loss"] == pytest.approx(min(val))
    trained = load_trained(best)
    emb = embed_split(trained, "test")
    n_test = len(Shards(info["shards"]).split("test"))
    assert emb.image.shape == (n_test, 128) and emb.gene.shape == (n_test, 128)
    assert emb.image_trunk.shape == (n_test, 1280)

    # Strict loading: a checkpoint with one key too many or too few does not load.
    state = torch.load(best / "model.pt", weights_only=True)
    bad = dict(state)
    bad["image_head.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="unexpected"):
        trained.model.load_saved_state(bad)
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(RuntimeError, match="missing"):
        trained.model.load_saved_state(bad)


def test_feature_cache_hit_matches_the_trunk(tiny_panel_dir, workdir):
    from hescape.data.image_transforms import ImageNorm, to_model_input
    from hescape.models.image_encoders import create_image_encoder
    from hescape.train.run import compute_image_feature_cache

    cfg = TrainConfig(cache_dir=str(workdir / "cache"))
    shards = Shards(build_shards(tiny_panel_dir, PreprocessConfig(image_size=32, out_dir=str(workdir / "s")),
                                 progress=False))
    first = compute_image_feature_cache(cfg, shards, progress=False)
    stamps = {s: os.stat(p).st_mtime_ns for s, p in first.items()}
    again = compute_image_feature_cache(cfg, shards, progress=False)
    assert again == first and {s: os.stat(p).st_mtime_ns for s, p in again.items()} == stamps  # a hit
    # A different transform (resolution) is a different key.
    other = Shards(build_shards(tiny_panel_dir, PreprocessConfig(image_size=48, out_dir=str(workdir / "s")),
                                progress=False))
    assert compute_image_feature_cache(cfg, other, progress=False)["train"] != first["train"]

    encoder = create_image_encoder("efficientnet_lite0").eval()
    images = torch.from_numpy(np.array(shards.split("val").images[:8]))
    with torch.no_grad():
        direct = encoder(to_model_input(images, ImageNorm(32, encoder.mean, encoder.std))).numpy()
    np.testing.assert_allclose(np.load(first["val"])[:8], direct, rtol=1e-4, atol=1e-5)


def test_cached_features_train_like_the_recomputed_trunk(tiny_panel_dir, workdir):
    """Same seed, no augmentation: heads trained on cached features see exactly what a frozen trunk
    recomputed at every step gives, so the training curves agree."""
    from hescape.train.run import prepare

    losses = {}
    for cached in (True, False):
        params = base_params(workdir, epochs=2, augment=False, feature_cache=cached, num_workers=1)
        _, prepared = prepare(tiny_panel_dir, params, progress=False)
        assert (prepared.worker_config["image_features"] is not None) == cached
        result, _ = run_local(prepared.worker_config, workdir / f"ckpt-{cached}")
        losses[cached] = [h["train_loss_epoch"] for h in result["history"]]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_frozen_trunk_stays_in_eval_mode(tiny_panel_dir):
    from hescape.train.loop import build_model

    cfg = TrainConfig(strategy="frozen")
    model = build_model(cfg, {"n_genes": 40, "image_input_size": 32})
    model.train()
    assert not any(m.training for m in model.image_trunk.module.modules())
    assert model.image_head.training
    assert all(not p.requires_grad for p in model.image_trunk.parameters())
    assert "image_trunk.module.trunk.conv_stem.weight" not in model.saved_state()
    assert any(k.startswith("gene_trunk.") for k in model.saved_state())


@pytest.mark.slow
def test_two_ray_workers_train(tiny_panel_dir, workdir, ray_session):
    from hescape.train.run import train_run

    run_id = train_run(tiny_panel_dir, base_params(workdir, epochs=3), local=False, progress=False)
    client = mlflow_client()
    assert client.get_run(run_id).info.status == "FINISHED"
    val = history(client, run_id, "val_loss")
    assert len(val) == 3
    best = json.loads(Path(client.download_artifacts(run_id, "checkpoints/best/checkpoint.json")).read_text())
    assert best["metrics"]["val_loss"] == pytest.approx(min(val))


def _ray_train_workers(root_pid: int) -> list:
    import psutil

    try:
        family = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for proc in family:
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.Error:
            pass
    return out


def _registered_checkpoint(storage: Path) -> bool:
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, json.JSONDecodeError):  # being rewritten right now
            pass
    return False


@pytest.mark.slow
def test_resume_after_a_killed_worker(tiny_panel_dir, workdir):
    """Kill one Ray Train worker process mid-run: Ray restarts the worker group, the loop resumes
    from the latest checkpoint, and the run finishes with every epoch."""
    import yaml

    epochs = 8
    params = base_params(workdir, epochs=epochs, feature_cache=False, augment=True, patience=100)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = None
    deadline = time.time() + 300
    with open(workdir / "train.log", "w") as log:  # Ray's own messages; stdout ends with the run id
        proc = subprocess.Popen([sys.executable, "-m", "hescape.cli", "train", "--panel", str(tiny_panel_dir),
                                 "--params", "params.yaml", "--no-progress"], cwd=workdir, env=env,
                                stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            while time.time() < deadline and proc.poll() is None:
                workers = _ray_train_workers(proc.pid)
                # Kill once Ray's controller has registered a checkpoint (its snapshot names one): a
                # checkpoint directory alone is not enough, since results a worker reported but the
                # controller has not polled yet die with the worker group.
                if killed is None and workers and _registered_checkpoint(workdir / "ray"):
                    killed = workers[-1].pid
                    os.kill(killed, signal.SIGKILL)
                time.sleep(0.2)
            out, _ = proc.communicate(timeout=max(1, deadline - time.time()))
        finally:
            if proc.poll() is None:
                proc.kill()
    out += (workdir / "train.log").read_text()[-4000:]
    assert killed is not None, "no worker was killed: the run ended before Ray registered a checkpoint"
    assert proc.returncode == 0, out[-4000:]
    run_id = re.findall(r"^[0-9a-f]{32}$", out, flags=re.MULTILINE)[-1]
    client = mlflow_client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "resumed_from_epoch" in run.data.tags, out[-4000:]
    resumed = int(run.data.tags["resumed_from_epoch"])
    assert 0 <= resumed < epochs - 1
    epochs_logged = sorted({m.step for m in client.get_metric_history(run_id, "val_loss")})
    assert epochs_logged == list(range(epochs))


def test_monitor_picks_the_best_checkpoint_by_a_score(tiny_panel_dir, workdir):
    """With ``monitor: val_R_at_5`` (higher is better) the best checkpoint is the epoch of the
    highest validation R@5, and early stopping follows the same metric."""
    from hescape.train.run import prepare

    params = base_params(workdir, epochs=4, num_workers=1, monitor="val_R_at_5", min_delta=0.0)
    _, prepared = prepare(tiny_panel_dir, params, progress=False)
    result, ctx = run_local(prepared.worker_config, workdir / "ckpt")
    scores = [h["val_R_at_5"] for h in result["history"]]
    best = json.loads((ctx.best_checkpoint() / "checkpoint.json").read_text())
    assert best["metrics"]["val_R_at_5"] == max(scores)
    assert result["best_epoch"] == best["epoch"] == scores.index(max(scores))
    assert result["monitor"] == "val_R_at_5" and result["best_score"] == max(scores)
