"""The ``tune`` block of params.yaml as typed config objects."""

from __future__ import annotations

from dataclasses import dataclass, field

from hescape.config import section
from hescape.errors import ConfigError

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "successive_halving", "none")
DIRECTIONS = ("maximize", "minimize")
# Per-epoch metrics of the training loop that a trial can report (hescape.train.loop).
METRICS = ("val_R_at_5", "val_i2g_R_at_5", "val_g2i_R_at_5", "val_loss", "train_loss_epoch")


def default_space() -> dict:
    """The search space of issue 5: temperature, both projection heads, embedding size, learning rate."""
    return {
        "temperature": {"type": "float", "low": 0.02, "high": 0.2, "log": True},
        "image_head": {"type": "categorical", "choices": ["linear", "mlp"]},
        "gene_head": {"type": "categorical", "choices": ["linear", "mlp"]},
        "head_hidden": {"type": "int", "low": 128, "high": 512, "step": 128},
        "head_dropout": {"type": "float", "low": 0.0, "high": 0.3},
        "embed_dim": {"type": "categorical", "choices": [64, 128, 256]},
        "lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    }


@dataclass
class SamplerConfig:
    """How trials are proposed.

    Attributes
    ----------
    type
        ``tpe`` (Optuna's default Bayesian sampler) or ``random``.
    seed
        Base seed; trial ``n`` is sampled with ``seed + n``, so parallel processes on one study never
        propose the same values and a study is reproducible whichever process ran which trial.
    n_startup_trials
        TPE only: random trials before the model takes over.
    """

    type: str = "tpe"
    seed: int | None = 0
    n_startup_trials: int = 4


@dataclass
class PrunerConfig:
    """How poor trials are stopped early, from their per-epoch validation score.

    Attributes
    ----------
    type
        ``median`` (stop a trial whose score is below the median of earlier trials at the same epoch),
        ``successive_halving`` (asynchronous successive halving) or ``none``.
    n_startup_trials, n_warmup_steps, interval_steps
        ``median``: completed trials before any pruning; epochs of every trial never pruned; epochs
        between two checks.
    min_resource, reduction_factor, min_early_stopping_rate
        ``successive_halving``: epochs before the first rung, promotion ratio, first rung index.
    """

    type: str = "median"
    n_startup_trials: int = 2
    n_warmup_steps: int = 0
    interval_steps: int = 1
    min_resource: int = 1
    reduction_factor: int = 2
    min_early_stopping_rate: int = 0


@dataclass
class TuneConfig:
    """The ``tune`` block of params.yaml (``hescape tune``).

    Attributes
    ----------
    trials
        Trials the study should hold in the end (complete + pruned), counted over every process and
        every restart; running the command again after an interruption finishes the same total.
    epochs
        Epochs per trial (overrides ``train.epochs``).
    storage
        Optuna RDB URL; ``$OPTUNA_STORAGE_URL`` (set by the cluster manifests) wins, ``--storage`` wins
        over both. A relative SQLite path is made absolute so that Ray workers reach the same file.
    metric, direction
        Per-epoch validation metric of the training loop that trials report and are ranked by (the
        best value over a trial's epochs); ``val_R_at_5`` is the mean of I2G and G2I global R@5.
    sampler, pruner
        See :class:`SamplerConfig` and :class:`PrunerConfig`.
    heartbeat_interval, grace_period
        Seconds between heartbeats of a running trial, and without one before another process marks
        the trial failed (its process died) and queues it again.
    max_retry
        How often a trial whose process died is queued again.
    max_failed_trials
        Trials failing with an error (not killed) that one process tolerates before it gives up.
    best_params_out
        File the best parameters are written to (``{study}`` is replaced by the study name); the
        final training reads its ``overrides``.
    space
        ``train`` key -> distribution; see :func:`hescape.tune.space.parse_space`.
    train
        ``train`` values fixed for every trial (e.g. ``num_workers: 1``), applied before the sampled ones.
    """

    trials: int = 8
    epochs: int = 2
    storage: str = "sqlite:///optuna.db"
    metric: str = "val_R_at_5"
    direction: str = "maximize"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 2
    max_failed_trials: int = 3
    best_params_out: str = "runs/tune/{study}/best_params.yaml"
    space: dict = field(default_factory=default_space)
    train: dict = field(default_factory=dict)

    def check(self) -> TuneConfig:
        """Raise :class:`ConfigError` on values Optuna would reject later, after minutes of work."""
        if self.trials < 1:
            raise ConfigError(f"tune.trials: must be at least 1, got {self.trials}")
        if self.epochs < 1:
            raise ConfigError(f"tune.epochs: must be at least 1, got {self.epochs}")
        if self.metric not in METRICS:
            raise ConfigError(f"tune.metric: {self.metric!r} is not a per-epoch metric of the training loop; "
                              f"known: {', '.join(METRICS)}")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"tune.direction: {self.direction!r} is not one of {', '.join(DIRECTIONS)}")
        if self.sampler.type not in SAMPLERS:
            raise ConfigError(f"tune.sampler.type: {self.sampler.type!r} is not one of {', '.join(SAMPLERS)}")
        if self.pruner.type not in PRUNERS:
            raise ConfigError(f"tune.pruner.type: {self.pruner.type!r} is not one of {', '.join(PRUNERS)}")
        if self.heartbeat_interval < 1:
            raise ConfigError(f"tune.heartbeat_interval: must be at least 1 s, got {self.heartbeat_interval}")
        if self.grace_period <= self.heartbeat_interval:
            raise ConfigError(f"tune.grace_period ({self.grace_period} s) must exceed tune.heartbeat_interval "
                              f"({self.heartbeat_interval} s), or live trials would be failed")
        if not isinstance(self.space, dict) or not self.space:
            raise ConfigError("tune.space: must be a non-empty mapping of train key -> distribution")
        return self


def tune_config(params: dict) -> TuneConfig:
    """Typed, checked ``tune`` block of ``params``.

    A ``space`` given in params.yaml replaces the default space as a whole (not key by key), so
    removing a key from the file removes it from the search.
    """
    return section(params, "tune", TuneConfig).check()
