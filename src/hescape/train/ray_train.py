"""Ray Train adapter: runs :func:`hescape.train.loop.train_worker` on N workers with TorchTrainer.

Thin on purpose: scaling, failure and checkpoint policy come from :class:`TrainConfig`; the loop
itself knows nothing about Ray beyond :class:`hescape.train.context.RayContext`.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from hescape.train.config import TrainConfig

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to ``$RAY_ADDRESS`` (a cluster, e.g. inside a KubeRay RayJob) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"HESCAPE_TORCH_THREADS": os.environ.get("HESCAPE_TORCH_THREADS", "1")}})


def ray_train_worker(config: dict) -> None:
    """Entry point Ray Train calls on every worker."""
    from hescape.train.loop import train_worker

    train_worker(config)


@dataclass
class FitResult:
    best_checkpoint: Path | None
    best_metrics: dict | None
    latest_checkpoint: Path | None
    history: list[dict]
    storage: Path


def fit(worker_config: dict, cfg: TrainConfig, *, name: str) -> FitResult:
    """Run distributed training; returns where the best and the latest checkpoint are."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray()
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    storage = Path(cfg.storage_path).resolve()
    trainer = TorchTrainer(
        train_loop_per_worker=ray_train_worker,
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Ray always keeps the latest checkpoint too, so resume-after-failure still works.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=cfg.monitor,
                                               checkpoint_score_order=cfg.monitor_mode),
        ),
    )
    # Ray Train installs its own SIGINT handler during fit() and leaves it in place; put ours back so
    # that Ctrl-C after training (or between tuning trials) behaves as the caller set it up.
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    if result.error is not None:
        raise result.error
    best = result.get_best_checkpoint(metric=cfg.monitor, mode=cfg.monitor_mode) if result.best_checkpoints else None
    best_metrics = None
    for ckpt, metrics in result.best_checkpoints or []:
        if best is not None and ckpt.path == best.path:
            best_metrics = metrics
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    return FitResult(
        best_checkpoint=Path(best.path) if best is not None else None,
        best_metrics=best_metrics,
        latest_checkpoint=Path(result.checkpoint.path) if result.checkpoint is not None else None,
        history=history,
        storage=storage / name,
    )
