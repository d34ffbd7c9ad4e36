"""MLflow conventions: one experiment per panel, run names, tags, artifacts, the model registry.

Default store: local SQLite (``sqlite:///mlflow.db``, artifacts under ``./mlartifacts``);
``MLFLOW_TRACKING_URI`` points everything at a server instead. Only the driver (and rank 0 of a
training run) talks to MLflow.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_ROOT = "mlartifacts"
REGISTERED_MODEL = "hescape-dual-encoder"

# Tag keys, so that the report and the UI filter on the same names.
TAG_PANEL = "hescape.panel"
TAG_PANEL_HASH = "hescape.panel_hash"
TAG_DVC_REV = "hescape.dvc_rev"
TAG_GIT_COMMIT = "hescape.git_commit"
TAG_IMAGE_ENCODER = "hescape.image_encoder"
TAG_GENE_ENCODER = "hescape.gene_encoder"
TAG_LOSS = "hescape.loss"
TAG_STRATEGY = "hescape.strategy"
TAG_SEED = "hescape.seed"
TAG_KIND = "hescape.kind"  # train | tune-study | tune-trial | evaluate | report
TAG_SHARDS = "hescape.shards"


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the local SQLite default; a relative SQLite path is made absolute
    so that Ray workers (which run in other directories) reach the same store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def experiment_name(panel_name: str) -> str:
    return f"hescape/{panel_name}"


def get_or_create_experiment(name: str) -> str:
    """Experiment id of ``name``; local SQLite stores get a local artifact folder."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri().startswith("sqlite:"):
        artifact_location = Path(os.environ.get("HESCAPE_ARTIFACT_ROOT", DEFAULT_ARTIFACT_ROOT)).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "0.0001", ...}`` (MLflow params are strings, <= 6000 chars)."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return {k: v[:6000] for k, v in out.items()}


def log_dict_artifact(client, run_id: str, obj, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(json.dumps(obj, indent=2, default=str))
        parent = str(Path(artifact_file).parent)
        client.log_artifact(run_id, str(path), artifact_path=None if parent == "." else parent)


def run_tags(*, panel_name: str, panel_hash: str, train_cfg, dvc_rev: str | None, git_commit: str | None,
             kind: str = "train") -> dict[str, str]:
    tags = {
        TAG_KIND: kind,
        TAG_PANEL: panel_name,
        TAG_PANEL_HASH: panel_hash,
        TAG_IMAGE_ENCODER: train_cfg.image_encoder,
        TAG_GENE_ENCODER: train_cfg.gene_encoder,
        TAG_LOSS: train_cfg.loss,
        TAG_STRATEGY: train_cfg.strategy,
        TAG_SEED: str(train_cfg.seed),
    }
    if dvc_rev:
        tags[TAG_DVC_REV] = dvc_rev
    if git_commit:
        tags[TAG_GIT_COMMIT] = git_commit
        tags["mlflow.source.git.commit"] = git_commit
    return tags
