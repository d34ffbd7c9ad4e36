"""Where studies live: an Optuna RDB storage (a SQLite file locally, PostgreSQL on the cluster).

The same URL is opened by every ``hescape tune`` process sharing a study and by rank 0 of each
trial's Ray Train workers (to report per-epoch scores), so a relative SQLite path is resolved to an
absolute one first.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

ENV_STORAGE = "OPTUNA_STORAGE_URL"
SQLITE_PREFIX = "sqlite:///"
SQLITE_TIMEOUT_S = 60  # several processes write to one file: wait for the lock rather than fail


def resolve_storage_url(cli_url: str | None = None, params_url: str | None = None) -> str:
    """The study's storage URL: ``--storage``, else ``$OPTUNA_STORAGE_URL`` (the cluster manifests set
    it), else ``tune.storage``; a relative SQLite path becomes absolute (Ray workers run elsewhere)."""
    url = cli_url or os.environ.get(ENV_STORAGE) or params_url or f"{SQLITE_PREFIX}optuna.db"
    if url.startswith(SQLITE_PREFIX) and not url.startswith(SQLITE_PREFIX + "/") and url != "sqlite:///:memory:":
        path = Path(url[len(SQLITE_PREFIX):]).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = SQLITE_PREFIX + str(path)
    return url


def redact(url: str) -> str:
    """``url`` without its password, for logs and MLflow tags."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not an SQLAlchemy URL: say nothing about it rather than leak it
        return url.split("://", 1)[0] + "://***"


def _engine_kwargs(url: str) -> dict:
    return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite:") else {}


def open_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = None):
    """An :class:`optuna.storages.RDBStorage` on ``url``.

    With ``heartbeat_interval``, a running trial records a heartbeat; a trial whose heartbeat is
    older than ``grace_period`` (its process was killed) is marked failed by the next process that
    starts a trial, and queued again (up to ``max_retry`` times) with the same parameters.

    Two processes opening a fresh database at once may both try to create its tables; the loser
    retries instead of failing.
    """
    import optuna
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            # Heartbeats are "experimental" in Optuna since 2.8 and unchanged since: no warning per run.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                kwargs = {}
                if heartbeat_interval is not None:
                    kwargs = {
                        "heartbeat_interval": int(heartbeat_interval),
                        "grace_period": int(grace_period) if grace_period else None,
                        "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                            max_retry=max_retry),
                    }
                storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **kwargs)
            break
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as exc:
            if attempt == 4:
                raise
            log.info("storage %s not ready (%s); retrying", redact(url), type(exc).__name__)
            time.sleep(0.5 * (attempt + 1))
    if url.startswith("sqlite:") and ":memory:" not in url:
        # Write-ahead logging: readers (pruning checks, the other process) no longer wait for writers.
        with storage.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    return storage


def fail_trials_without_heartbeat(study, rdb, grace_period: float) -> list[int]:
    """Fail (and queue again) RUNNING trials that never recorded a heartbeat and started more than
    ``grace_period`` seconds ago.

    Optuna's stale-trial check only looks at trials with a heartbeat, so a process killed between
    creating a trial and its first heartbeat would leave that trial RUNNING forever, and a study
    whose last slot it holds would never finish. ``rdb`` is the study's :class:`RDBStorage`.
    """
    import copy
    from datetime import datetime

    import optuna
    import sqlalchemy
    from optuna.storages._rdb import models  # the heartbeat table has no public reader
    from optuna.trial import TrialState

    now = datetime.now()  # Optuna stamps datetime_start with the local clock too
    old = {t._trial_id: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
           if t.datetime_start is not None and (now - t.datetime_start).total_seconds() > grace_period}
    if not old:
        return []
    table = models.TrialHeartbeatModel
    with rdb.engine.connect() as conn:
        beating = {row[0] for row in conn.execute(sqlalchemy.select(table.trial_id).where(table.trial_id.in_(old)))}
    failed = []
    for trial_id in sorted(set(old) - beating):
        try:
            if study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:  # another process got there first
            pass
    callback = rdb.get_heartbeat_stale_trial_callback()
    for trial_id in failed:
        log.warning("trial %d started %s and never sent a heartbeat (its process died): failed, queued again",
                    old[trial_id].number, old[trial_id].datetime_start)
        if callback is not None:
            callback(study, copy.deepcopy(study._storage.get_trial(trial_id)))
    return failed
