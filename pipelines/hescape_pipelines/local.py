"""Run the benchmark pipeline on this machine: ``kfp.local``'s subprocess runner, local Ray, MLflow
on SQLite, the repository's DVC remote.

The steps run as subprocesses on this interpreter (``SubprocessRunner(use_venv=False)``; nothing is
installed or downloaded) in the current directory, and inherit this process's environment, which
:func:`prepare_environment` sets first: ``TMPDIR`` in the project's ``.scratch/`` (each task leaves
a small folder there), an absolute ``MLFLOW_TRACKING_URI`` and artifact root, quiet telemetry-free
defaults. Artifacts land under ``<pipeline_root>/<pipeline>-<timestamp>/<task>/``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import warnings
from pathlib import Path

from hescape.errors import ConfigError

QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
             "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}


def prepare_environment(workdir: str | os.PathLike = ".") -> dict[str, str]:
    """Set (and return) what the local steps inherit; explicit settings in the environment win,
    except ``TMPDIR``, which always points into ``<workdir>/.scratch/kfp-tmp`` (Ray's own temporary
    folder stays short: ``$RAY_TMPDIR``, default ``/tmp``)."""
    from hescape import tracking

    workdir = Path(workdir).resolve()
    # Ray keeps its sessions (and AF_UNIX sockets, at most 107 bytes of path) under $RAY_TMPDIR, else
    # $TMPDIR: keep Ray on a short path when TMPDIR moves into the project.
    os.environ.setdefault("RAY_TMPDIR", "/tmp" if os.access("/tmp", os.W_OK) else tempfile.gettempdir())
    tmp = workdir / ".scratch" / "kfp-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # recomputed from TMPDIR
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()  # relative SQLite paths made absolute
    root = os.environ.get("HESCAPE_ARTIFACT_ROOT", tracking.DEFAULT_ARTIFACT_ROOT)
    os.environ["HESCAPE_ARTIFACT_ROOT"] = str(Path(root).resolve())
    return {k: os.environ[k] for k in ("TMPDIR", "RAY_TMPDIR", "MLFLOW_TRACKING_URI", "HESCAPE_ARTIFACT_ROOT")}


def pipeline_overrides(cfg, overrides: list[str] | None):
    """``cfg`` with ``pipeline.key=value`` overrides applied (values parsed as YAML)."""
    from hescape.config import apply_overrides
    from hescape.orchestration.config import pipeline_config

    items = list(overrides or [])
    bad = [item for item in items if not item.startswith("pipeline.")]
    if bad:
        raise ConfigError(f"run-local takes pipeline.* overrides only, got {bad}; train.* values go in "
                          "pipeline.train_overrides (e.g. --set 'pipeline.train_overrides=[\"train.epochs=1\"]')")
    params = apply_overrides({"pipeline": dataclasses.asdict(cfg)}, items)
    return pipeline_config(params)


def run_local(params_file: str | os.PathLike = "params.yaml", *, overrides: list[str] | None = None,
              mode: str | None = None, arguments: dict | None = None, enable_caching: bool = False) -> dict:
    """Run the benchmark pipeline with ``kfp.local`` and return where its results are.

    Parameters
    ----------
    params_file
        The params.yaml whose ``pipeline`` block builds the pipeline and whose other blocks the steps read.
    overrides
        ``pipeline.key=value`` overrides of that block (e.g. ``pipeline.tune=true``).
    mode
        ``execution_mode`` of this run (default: the block's; ``make run`` forces ``local``).
    arguments
        Further pipeline arguments (e.g. ``{"in_process": True}``).
    enable_caching
        kfp.local's cache (off: the steps write to MLflow and DVC).

    Returns
    -------
    dict
        ``seconds``, ``report_html``, ``report_md``, ``pipeline_root``, ``tracking_uri``, ``experiment``,
        ``champion`` (the registered version behind the alias, or ``None``).
    """
    from kfp import local

    from hescape import versioning
    from hescape.config import load_params
    from hescape.orchestration.config import pipeline_config
    from hescape_pipelines.benchmark import build_pipeline

    params_file = Path(params_file).resolve()
    cfg = pipeline_overrides(pipeline_config(load_params(params_file)), overrides)
    if mode:
        cfg = dataclasses.replace(cfg, execution_mode=mode)
    env = prepare_environment()
    pipeline_root = Path(cfg.pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True, enable_caching=enable_caching)
    dvc_hash = versioning.dvc_revision(cfg.panel) or ""
    pipeline = build_pipeline(cfg, panel_dvc_hash=dvc_hash, params_file=str(params_file))
    start = time.monotonic()
    with warnings.catch_warnings():
        # The component image is not named "python..."; the subprocess runner warns about that for every task.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        # Pod sizes and display names are Kubeflow settings; kfp.local says so for every task.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        pipeline(**(arguments or {}))
    seconds = time.monotonic() - start
    report_dir = Path(cfg.report_dir).resolve()
    return {"seconds": seconds, "report_html": str(report_dir / "report.html"),
            "report_md": str(report_dir / "report.md"), "pipeline_root": str(pipeline_root),
            "tracking_uri": env["MLFLOW_TRACKING_URI"], "experiment": cfg.experiment,
            "champion": champion(), "grid": cfg.grid_items(), "tune": cfg.tune}


def champion(alias: str = "champion") -> dict | None:
    """The registered model version behind ``alias`` (``None`` when there is none)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from hescape import tracking

    client = MlflowClient(tracking.tracking_uri())
    try:
        version = client.get_model_version_by_alias(tracking.REGISTERED_MODEL, alias)
    except MlflowException:
        return None
    return {"name": tracking.REGISTERED_MODEL, "version": version.version, "run_id": version.run_id,
            "source": version.source, "uri": f"models:/{tracking.REGISTERED_MODEL}@{alias}",
            "tags": dict(version.tags or {})}
