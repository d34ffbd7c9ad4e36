"""``hescape tune``: an Optuna study over the contrastive temperature, the projection heads, the
embedding size and the learning rate.

- Every trial is one short run of the training used by ``hescape train``
  (:func:`hescape.train.run.train_run`: Ray Train workers, frozen-feature cache, MLflow), with the
  sampled values applied as ``train.*`` values and ``tune.epochs`` epochs.
- Rank 0 of the trial's workers reports each epoch's validation score (``tune.metric``) to the trial
  and stops every worker when the pruner says so (:mod:`hescape.tune.pruning`).
- The study lives in an RDB storage. The command counts the trials the study already holds, so
  running it again after an interruption finishes the requested total, and several processes on one
  storage share the trials. A trial whose process died stops sending heartbeats; the next process to
  start a trial marks it failed and queues it again with the same values. A first Ctrl-C stops at the
  end of the current epoch (in-process trials) or trial, so the interrupted trial is recorded as failed.
- MLflow: one parent run per study (found again by its tags, so a resumed or parallel process reuses
  it), one child run per trial (the training run itself) tagged with the trial's final state. The
  best parameters go to ``tune.best_params_out`` (read by the final training) and to the parent run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hescape.config import section
from hescape.errors import ConfigError, HescapeError
from hescape.io import atomic_file
from hescape.train.config import TrainConfig
from hescape.tune.config import TuneConfig, tune_config
from hescape.tune.pruning import STOP
from hescape.tune.space import ParamSpec, apply_values, format_value, parse_space, suggest, to_overrides

log = logging.getLogger(__name__)

KIND_STUDY = "tune-study"
KIND_TRIAL = "tune-trial"
TAG_STUDY = "hescape.study"
TAG_TRIAL = "hescape.trial"
TAG_TRIAL_STATE = "hescape.trial_state"  # complete | pruned | failed
TAG_RETRY_OF = "hescape.retry_of"
TAG_PROCESS = "hescape.tune_process"  # host:pid of the process that ran the trial
USER_ATTR_RUN = "mlflow_run_id"
USER_ATTR_PROCESS = "process"
USER_ATTR_SURPLUS = "surplus"
BEST_ARTIFACT_DIR = "tune"
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,199}$")


@dataclass
class StudyResult:
    """What one ``hescape tune`` process leaves behind."""

    study_name: str
    storage: str  # redacted
    parent_run_id: str
    best_value: float
    best_trial: int
    best_params: dict[str, Any]
    overrides: list[str]
    best_params_path: Path
    counts: dict[str, int] = field(default_factory=dict)
    ran_here: int = 0
    elapsed_s: float = 0.0


def _process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def check_study_name(name: str) -> str:
    """Study names become MLflow tag filters and file names: keep them plain."""
    if not isinstance(name, str) or not _STUDY_NAME.match(name):
        raise ConfigError(f"study name {name!r}: use 1-200 letters, digits and _ . : + - (starting with a "
                          "letter or digit)")
    return name


def trial_counts(study) -> dict[str, int]:
    """Trials of the study by state name (``COMPLETE``, ``PRUNED``, ``RUNNING``, ``FAIL``, ``WAITING``)."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


#  MLflow


def _client():
    from mlflow.tracking import MlflowClient

    from hescape import tracking

    return MlflowClient(tracking.tracking_uri())


def _runs(client, experiment_id: str, study_name: str, kind: str, extra: str = ""):
    from mlflow.entities import ViewType

    flt = f"tags.`{TAG_STUDY}` = '{study_name}' and tags.`hescape.kind` = '{kind}'{extra}"
    return client.search_runs([experiment_id], filter_string=flt, run_view_type=ViewType.ACTIVE_ONLY,
                              max_results=10_000, order_by=["attributes.start_time ASC"])


def _pick(runs):
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)) if runs else None


def find_parent_run(client, experiment_id: str, study_name: str):
    """The study's parent run (the oldest one tagged with the study), or ``None``."""
    return _pick(_runs(client, experiment_id, study_name, KIND_STUDY))


def get_or_create_parent_run(client, experiment_id: str, study_name: str, tags: dict[str, str]) -> str:
    """One parent run per study. Processes starting together may each create one; all then keep the
    oldest (ties broken by run id) and each deletes its own extra one."""
    from hescape import tracking

    found = find_parent_run(client, experiment_id, study_name)
    if found is None:
        mine = client.create_run(experiment_id, run_name=study_name,
                                 tags={tracking.TAG_KIND: KIND_STUDY, TAG_STUDY: study_name, **tags})
        found = find_parent_run(client, experiment_id, study_name)
        if found.info.run_id != mine.info.run_id:
            client.delete_run(mine.info.run_id)
    else:
        client.update_run(found.info.run_id, status="RUNNING")  # resumed
        for key, value in tags.items():
            client.set_tag(found.info.run_id, key, value)
    return found.info.run_id


def _log_study_params(client, run_id: str, flat: dict[str, str]) -> None:
    """Params are immutable in MLflow: log the new keys; a value changed on a resumed study is kept
    as a ``changed.<key>`` tag (and a warning) instead of failing the run."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in flat.items() if k not in existing]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])
    for key, value in flat.items():
        if key in existing and existing[key] != value:
            log.warning("study parameter %s changed from %s to %s since the study started", key, existing[key], value)
            client.set_tag(run_id, f"changed.{key}", value)


def _child_run_id(client, experiment_id: str, study_name: str, number: int) -> str | None:
    runs = _runs(client, experiment_id, study_name, KIND_TRIAL, f" and tags.`{TAG_TRIAL}` = '{number}'")
    return runs[-1].info.run_id if runs else None


def close_orphan_runs(client, experiment_id: str, study_name: str, study) -> int:
    """Child runs left RUNNING by a killed process whose trial has since been failed: mark them."""
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    closed = 0
    for run in _runs(client, experiment_id, study_name, KIND_TRIAL, " and attributes.status = 'RUNNING'"):
        number = int(run.data.tags.get(TAG_TRIAL, -1))
        if states.get(number) == "FAIL":
            client.set_tag(run.info.run_id, TAG_TRIAL_STATE, "failed")
            client.set_terminated(run.info.run_id, "KILLED")
            closed += 1
    return closed


#  The study


def best_params_path(template: str, study_name: str) -> Path:
    return Path(template.format(study=study_name))


def write_best_params(path: Path, *, study_name: str, cfg: TuneConfig, best, counts: dict[str, int],
                      parent_run_id: str) -> list[str]:
    """Write the best trial's values as ``train.*`` overrides (YAML, atomically); returns them.

    ``overrides`` is what the final training applies (``--set`` text, YAML-typed values); ``params``
    holds the same values as typed YAML.
    """
    overrides = to_overrides(best.params)
    doc = {
        "overrides": overrides,
        "params": {f"train.{k}": v for k, v in best.params.items()},
        "study": study_name,
        "metric": cfg.metric,
        "direction": cfg.direction,
        "best_value": float(best.value),
        "best_trial": int(best.number),
        "best_run_id": best.user_attrs.get(USER_ATTR_RUN),
        "mlflow_parent_run_id": parent_run_id,
        "epochs_per_trial": cfg.epochs,
        "trials": {k.lower(): v for k, v in sorted(counts.items())},
    }
    with atomic_file(path) as fh:
        fh.write(f"# Best parameters of Optuna study {study_name} (hescape tune). The final training applies\n"
                 "# `overrides` (each one a --set value).\n")
        yaml.safe_dump(doc, fh, sort_keys=False)
    return overrides


def read_best_overrides(path: str | Path) -> list[str]:
    """The ``overrides`` of a best-parameters file, for :func:`hescape.config.apply_overrides`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"best parameters file {path} does not exist (run `hescape tune` first)")
    doc = yaml.safe_load(path.read_text()) or {}
    overrides = doc.get("overrides") if isinstance(doc, dict) else None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{path}: expected a list of 'key=value' strings under 'overrides'")
    return overrides


def run_study(panel_dir: str | Path, params: dict, *, study_name: str, trials: int | None = None,
              storage: str | None = None, local: bool = False, progress: bool = False,
              best_params_out: str | None = None, poll_s: float | None = None) -> StudyResult:
    """Run (or continue, or join) study ``study_name`` until it holds ``tune.trials`` complete or
    pruned trials, then write and log the best parameters.

    Parameters
    ----------
    panel_dir
        Curated panel directory (preprocessed into shards on first use, as by ``hescape train``).
    params
        The whole params dict (``tune``, ``train``, ``preprocess``, ...), overrides applied.
    study_name
        Name of the study in the storage (and of the MLflow parent run).
    trials, storage, best_params_out
        Override ``tune.trials``, the storage URL (see :func:`hescape.tune.storage.resolve_storage_url`)
        and ``tune.best_params_out``.
    local
        Train each trial in this process instead of on Ray Train workers.
    poll_s
        Seconds between checks while the remaining trials run in other processes.
    """
    import optuna

    from hescape import tracking
    from hescape.data.panel import read_meta
    from hescape.tune.pruning import build_pruner
    from hescape.tune.samplers import build_sampler
    from hescape.tune.storage import fail_trials_without_heartbeat, open_storage, redact, resolve_storage_url

    t_start = time.perf_counter()
    check_study_name(study_name)
    cfg = tune_config(params)
    if trials is not None:
        if int(trials) < 1:
            raise ConfigError(f"--trials: must be at least 1, got {trials}")
        cfg.trials = int(trials)
    specs = parse_space(cfg.space)
    base = apply_values(params, {**cfg.train, "epochs": cfg.epochs})
    train_cfg = section(base, "train", TrainConfig)  # a bad fixed value fails here, not in every trial
    url = resolve_storage_url(storage, cfg.storage)
    out_path = best_params_path(best_params_out or cfg.best_params_out, study_name)

    meta = read_meta(panel_dir)
    experiment_id = tracking.get_or_create_experiment(train_cfg.experiment or tracking.experiment_name(meta.name))
    client = _client()

    rdb = open_storage(url, heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period,
                       max_retry=cfg.max_retry)
    study = optuna.create_study(study_name=study_name, storage=rdb, sampler=build_sampler(cfg.sampler),
                                pruner=build_pruner(cfg.pruner), direction=cfg.direction, load_if_exists=True)
    if study.direction.name.lower() != cfg.direction:
        raise ConfigError(f"study {study_name!r} exists with direction {study.direction.name.lower()}, "
                          f"but tune.direction is {cfg.direction}")
    parent_run_id = get_or_create_parent_run(client, experiment_id, study_name, {
        tracking.TAG_PANEL: meta.name, "hescape.optuna_storage": redact(url), "tune.trials": str(cfg.trials)})
    _log_study_params(client, parent_run_id, tracking.flatten({"tune": {
        "metric": cfg.metric, "direction": cfg.direction, "epochs": cfg.epochs, "sampler": asdict(cfg.sampler),
        "pruner": asdict(cfg.pruner), "space": cfg.space, "train": cfg.train}}))
    log.info("study %s on %s: %s; target %d trials (complete + pruned)", study_name, redact(url),
             trial_counts(study) or "new", cfg.trials)

    objective = _Objective(panel_dir=Path(panel_dir), base=base, specs=specs, cfg=cfg, study_name=study_name,
                           storage_url=url, parent_run_id=parent_run_id, experiment_id=experiment_id,
                           client=client, local=local, progress=progress)
    failures = 0
    poll = poll_s if poll_s is not None else min(5.0, float(cfg.heartbeat_interval))
    with deferred_interrupt():
        while True:
            _raise_if_interrupted()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # dead processes' trials: failed, queued again
            fail_trials_without_heartbeat(study, rdb, cfg.grace_period)
            close_orphan_runs(client, experiment_id, study_name, study)
            counts = trial_counts(study)
            done = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
            if done >= cfg.trials:
                break
            if done + counts.get("RUNNING", 0) >= cfg.trials:
                # The last trials run in other processes. Wait: either they finish, or their process
                # died and, once its heartbeat is older than the grace period, a slot opens again.
                STOP.wait(poll)
                continue
            try:
                study.optimize(objective, n_trials=1, catch=(SurplusTrial,), callbacks=[objective.after_trial],
                               gc_after_trial=False, show_progress_bar=False)
            except Exception as exc:  # the trial is recorded as failed; KeyboardInterrupt propagates
                failures += 1
                if failures > cfg.max_failed_trials:
                    raise HescapeError(f"{failures} trials of study {study_name!r} failed in this process; "
                                       f"last error: {exc!r}") from exc
                log.warning("trial failed (%d of at most %d in this process): %r", failures,
                            cfg.max_failed_trials, exc)

    close_orphan_runs(client, experiment_id, study_name, study)
    counts = trial_counts(study)
    try:
        best = study.best_trial
    except ValueError:
        raise HescapeError(f"study {study_name!r} has no completed trial (all {sum(counts.values())} were "
                           "pruned or failed); loosen tune.pruner or check the failures") from None
    overrides = write_best_params(out_path, study_name=study_name, cfg=cfg, best=best, counts=counts,
                                  parent_run_id=parent_run_id)
    _log_best(client, parent_run_id, study, best, counts, out_path)
    elapsed = time.perf_counter() - t_start
    log.info("study %s: best %s = %.4f (trial %d): %s -> %s", study_name, cfg.metric, best.value, best.number,
             " ".join(overrides), out_path)
    return StudyResult(study_name=study_name, storage=redact(url), parent_run_id=parent_run_id,
                       best_value=float(best.value), best_trial=best.number, best_params=dict(best.params),
                       overrides=overrides, best_params_path=out_path, counts=counts, ran_here=objective.started,
                       elapsed_s=elapsed)


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C while the study runs: the first one stops at the next safe point (the end of an epoch
    of a trial trained in this process, or between trials), the second one at once.

    A KeyboardInterrupt raised wherever the signal lands can land inside an SQLite write of the
    MLflow store and leave it locked for the rest of the process, so that recording the interrupted
    trial as failed fails too. Ray Train replaces this handler while a trial's workers run and aborts
    them itself (see :class:`_Objective`).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.clear()

    def handler(signum, frame):
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()
        log.warning("interrupted: stopping at the end of this epoch or trial (Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        STOP.clear()


def _raise_if_interrupted() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt("interrupted between trials")


def _log_best(client, run_id: str, study, best, counts: dict[str, int], path: Path) -> None:
    import tempfile

    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    metrics = [Metric("best_value", float(best.value), now, best.number)]
    metrics += [Metric(f"n_{state.lower()}", float(n), now, 0) for state, n in counts.items()]
    tags = [RunTag(f"best.train.{k}", format_value(v)) for k, v in best.params.items()]
    tags += [RunTag("best.trial", str(best.number)), RunTag("best.run_id", str(best.user_attrs.get(USER_ATTR_RUN)))]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    client.log_artifact(run_id, str(path), artifact_path=BEST_ARTIFACT_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.csv"
        study.trials_dataframe().to_csv(table, index=False)
        client.log_artifact(run_id, str(table), artifact_path=BEST_ARTIFACT_DIR)
    client.set_terminated(run_id, "FINISHED")


class SurplusTrial(Exception):
    """Another process took the last slot between this process's count and its new trial."""


class _Objective:
    """One trial: sample, train (the ``hescape train`` function), read the child run's scores."""

    def __init__(self, *, panel_dir: Path, base: dict, specs: list[ParamSpec], cfg: TuneConfig, study_name: str,
                 storage_url: str, parent_run_id: str, experiment_id: str, client, local: bool, progress: bool):
        self.panel_dir, self.base, self.specs, self.cfg = panel_dir, base, specs, cfg
        self.study_name, self.storage_url, self.parent_run_id = study_name, storage_url, parent_run_id
        self.experiment_id, self.client, self.local, self.progress = experiment_id, client, local, progress
        self.started = 0  # trials this process trained (surplus ones excluded)

    def __call__(self, trial) -> float:
        import optuna
        from mlflow.entities import Metric, Param, RunTag

        from hescape.train.run import train_run
        from hescape.tune.pruning import hook_spec

        _raise_if_interrupted()
        if self._surplus(trial):
            # Trials are numbered in creation order: the first `tune.trials` live or finished ones
            # count, a later one created in the same instant by a parallel process does not run.
            trial.set_user_attr(USER_ATTR_SURPLUS, True)
            raise SurplusTrial(f"trial {trial.number}: the study already has its {self.cfg.trials} trials")
        values = suggest(trial, self.specs)
        tags = {"hescape.kind": KIND_TRIAL, TAG_STUDY: self.study_name, TAG_TRIAL: str(trial.number),
                TAG_PROCESS: _process_id()}
        retry_of = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retry_of is not None:
            tags[TAG_RETRY_OF] = str(retry_of)
        log.info("trial %d: %s", trial.number, " ".join(to_overrides(values)))
        hook = hook_spec(storage=self.storage_url, study_name=self.study_name, trial_id=trial._trial_id,
                         metric=self.cfg.metric, pruner=self.cfg.pruner, epochs=self.cfg.epochs)
        sigint = signal.getsignal(signal.SIGINT)
        self.started += 1
        try:
            run_id = train_run(self.panel_dir, apply_values(self.base, values), local=self.local,
                               progress=self.progress, run_name=f"{self.study_name}-trial-{trial.number}",
                               parent_run_id=self.parent_run_id, extra_tags=tags, epoch_hook=hook)
        except BaseException as exc:
            run_id = _child_run_id(self.client, self.experiment_id, self.study_name, trial.number)
            if run_id is not None:
                self.client.log_batch(run_id, tags=[RunTag(TAG_TRIAL_STATE, "failed"),
                                                    RunTag("hescape.error", repr(exc)[:5000])])
            if isinstance(exc, SystemExit):
                # Ray Train's Ctrl-C handler aborts the run and calls sys.exit() inside fit(); as an
                # interruption, Optuna records the trial as failed instead of leaving it RUNNING.
                raise KeyboardInterrupt(f"trial {trial.number} interrupted") from exc
            raise
        finally:
            # Ray Train installs that handler for fit() and never puts the previous one back.
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, sigint)
        trial.set_user_attr(USER_ATTR_RUN, run_id)
        trial.set_user_attr(USER_ATTR_PROCESS, _process_id())
        history = sorted(self.client.get_metric_history(run_id, self.cfg.metric), key=lambda m: m.step)
        if not history:
            raise HescapeError(f"trial {trial.number}: run {run_id} logged no {self.cfg.metric!r}")
        scores = [m.value for m in history]
        value = max(scores) if self.cfg.direction == "maximize" else min(scores)
        pruned = any(m.value for m in self.client.get_metric_history(run_id, "stopped_by_hook"))
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric("trial_value", float(value), now, 0)],
            params=[Param(f"tune.{k}", format_value(v)) for k, v in values.items()],
            tags=[RunTag(TAG_TRIAL_STATE, "pruned" if pruned else "complete"),
                  RunTag("hescape.epochs_run", str(len(history)))])
        if pruned:
            raise optuna.TrialPruned(f"pruned after epoch {history[-1].step} ({self.cfg.metric} {scores[-1]:.4f})")
        return value

    def _surplus(self, trial) -> bool:
        from optuna.trial import TrialState

        live = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                TrialState.RUNNING))
        return sum(t.number < trial.number for t in live) >= self.cfg.trials

    def after_trial(self, study, trial) -> None:
        """Parent run: each finished trial's value, and the best so far (charts of the study)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        if trial.value is not None:
            metrics.append(Metric("trial_value", float(trial.value), now, trial.number))
        try:
            metrics.append(Metric("best_value", float(study.best_value), now, trial.number))
        except ValueError:  # no completed trial yet
            pass
        if metrics:
            self.client.log_batch(self.parent_run_id, metrics=metrics)
