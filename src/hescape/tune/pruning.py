"""The bridge from a training run to an Optuna trial: report each epoch's validation score and
ask the pruner whether to stop. Runs on rank 0 of the trial's Ray Train workers, talking to the
study's RDB storage directly (SQLite locally, PostgreSQL on a cluster)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict

# Set by `hescape tune` on the first Ctrl-C. A trial trained in that process (``--local``) then stops
# at the end of its epoch, where no database transaction is open: an interrupt landing inside an
# SQLite write can leave the MLflow store locked for the rest of the process.
STOP = threading.Event()


def build_pruner(cfg=None):
    """The Optuna pruner of ``tune.pruner`` (a :class:`~hescape.tune.config.PrunerConfig` or its dict).

    Built from the same config in the ``hescape tune`` process and in the trial's rank-0 worker: the
    pruner is not stored with the study, and ``optuna.load_study`` alone would give a default one.
    """
    import optuna

    from hescape.config import from_dict
    from hescape.tune.config import PrunerConfig

    if cfg is None:
        cfg = PrunerConfig()
    elif isinstance(cfg, dict):
        cfg = from_dict(PrunerConfig, cfg, where="tune.pruner")
    if cfg.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps,
                                           interval_steps=cfg.interval_steps)
    if cfg.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.min_resource,
                                                      reduction_factor=cfg.reduction_factor,
                                                      min_early_stopping_rate=cfg.min_early_stopping_rate)
    if cfg.type == "none":
        return optuna.pruners.NopPruner()
    from hescape.errors import ConfigError
    from hescape.tune.config import PRUNERS

    raise ConfigError(f"tune.pruner.type: {cfg.type!r} is not one of {', '.join(PRUNERS)}")


def hook_spec(*, storage: str, study_name: str, trial_id: int, metric: str, pruner, epochs: int | None = None) -> dict:
    """The ``epoch_hook`` argument of :func:`hescape.train.run.train_run` for one trial (plain data:
    it travels to the Ray workers inside the worker config)."""
    return {"storage": storage, "study_name": study_name, "trial_id": int(trial_id), "metric": metric,
            "pruner": pruner if isinstance(pruner, dict) else asdict(pruner), "epochs": epochs}


def make_epoch_hook(spec: dict) -> Callable[[dict, int], bool]:
    """``spec``: ``storage`` (RDB URL), ``study_name``, ``trial_id``, ``metric`` (a key of the
    loop's per-epoch metrics, e.g. ``val_R_at_5``), ``pruner`` (``tune.pruner``) and ``epochs`` (the
    trial's epochs, optional). Returns ``hook(metrics, epoch) -> prune?``.

    The last epoch is reported but never judged: stopping there saves nothing, and the trial would
    count as pruned instead of complete.
    """
    import optuna

    from hescape.tune.storage import open_storage

    storage = open_storage(spec["storage"])
    # The sampler is never asked for anything here; the random one costs nothing to build.
    study = optuna.load_study(study_name=spec["study_name"], storage=storage,
                              sampler=optuna.samplers.RandomSampler(), pruner=build_pruner(spec.get("pruner")))
    trial = optuna.trial.Trial(study, int(spec["trial_id"]))
    metric = spec["metric"]
    last = spec.get("epochs")
    last = int(last) - 1 if last else None

    def hook(metrics: dict, epoch: int) -> bool:
        trial.report(float(metrics[metric]), step=epoch)
        if STOP.is_set():
            raise KeyboardInterrupt(f"interrupted after epoch {epoch}")
        return epoch != last and trial.should_prune()

    return hook
