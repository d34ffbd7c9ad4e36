"""``hescape train``: the driver of one alignment run.

1. preprocess the panel into shards (reused when present);
2. compute what frozen trunks would produce, once, through the feature cache (image trunk when
   ``strategy: frozen``; the gene encoder when it is frozen, e.g. DRVI pretrained on the training
   split);
3. open an MLflow run (one experiment per panel) with the resolved config, tags and ``panel.json``;
4. run the training loop on Ray Train workers (or in-process with ``local=True``);
5. log the best and last checkpoints and the best model, and return the run id.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hescape.config import section
from hescape.data.shards import PreprocessConfig, Shards, build_shards
from hescape.train.config import TrainConfig

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
FEATURE_VERSION = 1


@dataclass
class PreparedRun:
    """Everything a worker needs, plus what the driver logs."""

    shards: Shards
    worker_config: dict
    feature_keys: dict


def image_feature_description(cfg: TrainConfig, shards: Shards) -> dict:
    from hescape.models.image_encoders import image_encoder_spec

    spec = image_encoder_spec(cfg.image_encoder)
    return {
        "kind": "image", "version": FEATURE_VERSION, "panel_hash": shards.panel_hash,
        "shards": shards.root.name, "encoder": cfg.image_encoder, "pretrained": cfg.pretrained,
        "weights_dir": cfg.weights_dir, "encoder_kwargs": cfg.image_encoder_kwargs,
        "image_size": shards.image_size, "input_size": input_size_for(cfg, shards),
        "mean": list(spec.mean), "std": list(spec.std),
    }


def input_size_for(cfg: TrainConfig, shards: Shards) -> int:
    """The encoder's input side. CPU-sized encoders (``extra.any_input_size``) take the shards'
    resolution as is (no resize on the hot path); foundation models get their native input size."""
    from hescape.models.image_encoders import image_encoder_spec

    spec = image_encoder_spec(cfg.image_encoder)
    return shards.image_size if spec.extra.get("any_input_size") else int(spec.input_size)


def compute_image_feature_cache(cfg: TrainConfig, shards: Shards, *, progress: bool = True) -> dict[str, str]:
    from hescape.data.feature_cache import FeatureCache, compute_image_features
    from hescape.data.image_transforms import ImageNorm
    from hescape.models.image_encoders import create_image_encoder

    description = image_feature_description(cfg, shards)
    encoder = None

    def compute(split: str) -> np.ndarray:
        nonlocal encoder
        if encoder is None:
            encoder = create_image_encoder(cfg.image_encoder, pretrained=cfg.pretrained, weights_dir=cfg.weights_dir,
                                           **cfg.image_encoder_kwargs)
        norm = ImageNorm(input_size=description["input_size"], mean=tuple(encoder.mean), std=tuple(encoder.std))
        return compute_image_features(encoder, shards.split(split).images, norm, progress=progress,
                                      desc=f"{cfg.image_encoder} features ({split})")

    paths = FeatureCache(cfg.cache_dir).get_or_compute(description, available_splits(shards), compute)
    return {s: str(p) for s, p in paths.items()}


def available_splits(shards: Shards) -> list[str]:
    return [s for s in SPLITS if s in shards.manifest["sizes"] or s in shards.manifest.get("split_aliases", {})]


def compute_gene_feature_cache(cfg: TrainConfig, shards: Shards, panel_dir: Path, *,
                               progress: bool = True) -> dict[str, str] | None:
    """Cached features of a frozen gene encoder (DRVI); ``None`` for trainable gene encoders."""
    from hescape.models.gene_encoders import frozen_gene_features

    return frozen_gene_features(cfg.gene_encoder, shards=shards, panel_dir=panel_dir, cache_dir=cfg.cache_dir,
                                seed=cfg.seed, progress=progress, **cfg.gene_encoder_kwargs)


def prepare(panel_dir: str | Path, params: dict, *, progress: bool = True) -> tuple[TrainConfig, PreparedRun]:
    train_cfg = section(params, "train", TrainConfig)
    pre_cfg = section(params, "preprocess", PreprocessConfig)
    panel_dir = Path(panel_dir)
    shards = Shards(build_shards(panel_dir, pre_cfg, progress=progress))
    spec: dict = {"n_genes": len(shards.genes), "image_input_size": input_size_for(train_cfg, shards)}
    image_features = None
    if train_cfg.strategy == "frozen" and train_cfg.feature_cache:
        image_features = compute_image_feature_cache(train_cfg, shards, progress=progress)
        spec["image_feature_dim"] = int(np.load(image_features["train"], mmap_mode="r").shape[1])
    gene_features = compute_gene_feature_cache(train_cfg, shards, panel_dir, progress=progress)
    if gene_features is not None:
        spec["gene_feature_dim"] = int(np.load(gene_features["train"], mmap_mode="r").shape[1])
    worker_config = {
        "train": asdict(train_cfg),
        "shards": str(shards.root.resolve()),
        "image_features": image_features,
        "gene_features": gene_features,
        "spec": spec,
    }
    return train_cfg, PreparedRun(shards=shards, worker_config=worker_config,
                                  feature_keys={"image": image_features, "gene": gene_features})


def train_run(panel_dir: str | Path, params: dict, *, local: bool = False, progress: bool = True,
              run_name: str | None = None, parent_run_id: str | None = None, extra_tags: dict | None = None,
              epoch_hook: dict | None = None) -> str:
    """Train one run end to end and return its MLflow run id.

    ``epoch_hook`` (``storage``, ``study_name``, ``trial_id``, ``metric``) lets an Optuna trial
    see every epoch's validation score and prune the run (see :mod:`hescape.tune.pruning`).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from hescape import tracking
    from hescape.versioning import dvc_revision, git_commit

    panel_dir = Path(panel_dir)
    cfg, prepared = prepare(panel_dir, params, progress=progress)
    shards = prepared.shards
    panel_name = shards.manifest["panel_name"]
    experiment_id = tracking.get_or_create_experiment(cfg.experiment or tracking.experiment_name(panel_name))
    client = MlflowClient(tracking.tracking_uri())
    tags = tracking.run_tags(panel_name=panel_name, panel_hash=shards.panel_hash, train_cfg=cfg,
                             dvc_rev=dvc_revision(panel_dir), git_commit=git_commit(Path(__file__).resolve().parent))
    tags[tracking.TAG_SHARDS] = str(shards.root.resolve())
    tags["hescape.panel_dir"] = str(panel_dir.resolve())
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.update(extra_tags or {})
    run = client.create_run(experiment_id, run_name=run_name or cfg.run_name, tags=tags)
    run_id = run.info.run_id
    try:
        resolved = {"train": asdict(cfg), "preprocess": params.get("preprocess", {}),
                    "spec": prepared.worker_config["spec"], "feature_cache": prepared.feature_keys}
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in tracking.flatten(
            {"train": asdict(cfg), "preprocess": params.get("preprocess") or {}}).items()])
        tracking.log_dict_artifact(client, run_id, resolved, "config/resolved_config.json")
        client.log_artifact(run_id, str(panel_dir / "panel.json"), artifact_path="panel")
        client.log_artifact(run_id, str(shards.root / "manifest.json"), artifact_path="panel")

        worker_config = dict(prepared.worker_config)
        worker_config["tracking"] = {"uri": tracking.tracking_uri(), "run_id": run_id}
        worker_config["epoch_hook"] = epoch_hook
        if local:
            from hescape.train.loop import run_local

            storage = Path(cfg.storage_path) / f"{run_id}"
            _, ctx = run_local(worker_config, storage)
            best, latest = ctx.best_checkpoint(), ctx.latest_checkpoint()
        else:
            from hescape.train.ray_train import fit

            result = fit(worker_config, cfg, name=f"{panel_name}-{run_id}")
            best, latest = result.best_checkpoint, result.latest_checkpoint
        if best is None:
            raise RuntimeError("training produced no checkpoint")
        info = json.loads((best / "checkpoint.json").read_text())
        client.log_metric(run_id, "best_val_loss", info["metrics"]["val_loss"])
        client.log_metric(run_id, "best_score", info["metrics"][cfg.monitor])
        client.set_tag(run_id, "hescape.monitor", cfg.monitor)
        client.log_metric(run_id, "best_epoch", info["epoch"])
        client.log_artifacts(run_id, str(best), artifact_path="checkpoints/best")
        if latest is not None:
            client.log_artifacts(run_id, str(latest), artifact_path="checkpoints/last")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def download_checkpoint(run_id: str, which: str = "best", dst: str | Path | None = None) -> Path:
    """Fetch a run's checkpoint directory (``best`` or ``last``) from MLflow."""
    import mlflow

    from hescape import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoints/{which}",
                                               dst_path=str(dst) if dst else None)
    return Path(path)


