"""The bridge from a training run to an Optuna trial: report each epoch's validation score and
ask the pruner whether to stop. Runs on rank 0 of the trial's Ray Train workers, talking to the
study's RDB storage directly (SQLite locally, PostgreSQL on a cluster)."""

from __future__ import annotations

from collections.abc import Callable


def make_epoch_hook(spec: dict) -> Callable[[dict, int], bool]:
    """``spec``: ``storage`` (RDB URL), ``study_name``, ``trial_id`` and ``metric`` (a key of the
    loop's per-epoch metrics, e.g. ``val_R_at_5``). Returns ``hook(metrics, epoch) -> prune?``."""
    import optuna

    storage = optuna.storages.get_storage(spec["storage"])
    study = optuna.load_study(study_name=spec["study_name"], storage=storage)
    trial = optuna.trial.Trial(study, int(spec["trial_id"]))
    metric = spec["metric"]

    def hook(metrics: dict, epoch: int) -> bool:
        trial.report(float(metrics[metric]), step=epoch)
        return trial.should_prune()

    return hook
