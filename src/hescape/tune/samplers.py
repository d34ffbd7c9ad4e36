"""Samplers of ``tune.sampler``, seeded per trial.

A seeded Optuna sampler draws from one random stream per process: two ``hescape tune`` processes on
one study, started with the same seed, would propose the same values trial after trial, and a study
resumed after an interruption would repeat the values it already tried. Here trial ``n`` is sampled
by a sampler seeded with ``seed + n`` (reading the whole shared history, as TPE always does), so
every trial gets its own draws whichever process runs it, and a study is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.samplers import BaseSampler

from hescape.tune.config import SAMPLERS, SamplerConfig


class TrialSeededSampler(BaseSampler):
    """Delegates every call about trial ``n`` to ``factory(seed + n)``.

    Parameters
    ----------
    factory
        ``seed -> sampler`` (``seed`` is ``None`` when unseeded).
    seed
        Base seed, or ``None`` for nondeterministic sampling.
    """

    def __init__(self, factory: Callable[[int | None], BaseSampler], seed: int | None):
        self._factory = factory
        self._seed = seed
        self._samplers: dict[int, BaseSampler] = {}
        self._shared = factory(seed)  # for calls that name no trial

    def _for(self, trial) -> BaseSampler:
        number = trial.number
        if number not in self._samplers:
            self._samplers.clear()  # one trial at a time per process: keep only the current one
            self._samplers[number] = self._factory(None if self._seed is None else self._seed + number)
        return self._samplers[number]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._seed = None
        self._samplers.clear()


def build_sampler(cfg: SamplerConfig | None = None) -> BaseSampler:
    """The sampler of ``tune.sampler``, seeded per trial (see the module docstring)."""
    cfg = cfg or SamplerConfig()
    if cfg.type == "tpe":
        def factory(seed):
            # constant_liar: trials running in other processes count as bad, so parallel processes
            # spread out instead of all proposing the current optimum.
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup_trials, constant_liar=True)
    elif cfg.type == "random":
        def factory(seed):
            return optuna.samplers.RandomSampler(seed=seed)
    else:
        from hescape.errors import ConfigError

        raise ConfigError(f"tune.sampler.type: {cfg.type!r} is not one of {', '.join(SAMPLERS)}")
    return TrialSeededSampler(factory, cfg.seed)
