"""Curated panels for the pipeline: DVC pull-or-repro in the repository, fetch-by-hash elsewhere.

In the repository (local mode), :func:`pull_or_repro` brings a DVC-tracked panel into the workspace:
``dvc pull`` when the remote has the version ``dvc.lock`` records, ``dvc repro`` of the stage that
writes it when it has not (or when its parameters changed), then ``dvc push`` so that the remote
holds it for the next time.

Pods of the cluster mode have no git checkout. :func:`fetch_panel` pulls one version of a panel by
its DVC hash (the ``md5`` of the directory, ``<hex>.dir``, read from ``dvc.lock`` when the pipeline
is compiled): it writes a one-output ``.dvc`` file into an empty ``dvc init --no-scm`` project
whose default remote is the cluster's (``$DVC_REMOTE_URL`` and ``$S3_ENDPOINT_URL`` of ConfigMap
``hescape-config``) and runs ``dvc pull``. Only DVC's command line and documented file formats are
used.

In the cluster, every RayJob fetches into the same directory of the shared data volume
(``/app/data/panels/<name>``, PVC ``hescape-data``), and the jobs of one pipeline run may start at
once: each fetch works in its own throw-away project, a version already there (or put there by a
concurrent fetch meanwhile) is kept as it is, and only a missing or other version is replaced.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import yaml

from hescape import versioning
from hescape.errors import ConfigError
from hescape.io import atomic_dir, atomic_file

log = logging.getLogger(__name__)

ENV_REMOTE_URL = "DVC_REMOTE_URL"
ENV_ENDPOINTS = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
REMOTE_NAME = "pipeline"


def stage_for_output(path: str | os.PathLike, repo: str | os.PathLike) -> str | None:
    """Name of the ``dvc.yaml`` stage (of ``repo``) that lists ``path`` under ``outs``, or ``None``."""
    dvc_yaml = Path(repo) / "dvc.yaml"
    if not dvc_yaml.is_file():
        return None
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(repo)).replace(os.sep, "/")
    for name, stage in stages.items():
        for out in (stage or {}).get("outs") or []:
            out_path = next(iter(out)) if isinstance(out, dict) else out
            if str(out_path).rstrip("/") == rel:
                return name
    return None


def pull_or_repro(panel: str | os.PathLike, *, repo: str | os.PathLike | None = None, push: bool = True,
                  timeout: float | None = None) -> dict:
    """Bring the DVC-tracked ``panel`` into the workspace of ``repo`` and make the remote hold it.

    1. ``dvc pull <panel>`` when ``dvc.lock`` records a version of it (a failure, such as a version
       the remote does not have yet, is logged and falls through);
    2. ``dvc repro <stage>`` of the stage writing it (a no-op when it is up to date; runs it when
       its parameters or code changed or the pull found nothing);
    3. ``dvc push <panel>`` (``push=True``) to the default remote.

    A panel directory that no DVC stage or ``.dvc`` file tracks is used as it is.

    Returns
    -------
    dict
        ``panel_dir`` (absolute), ``dvc_hash`` (after the steps; ``None`` if untracked), ``actions``
        (what ran, in order).
    """
    panel = Path(panel)
    root = Path(repo) if repo is not None else versioning.find_repo_root(panel.resolve().parent)
    actions: list[str] = []
    if root is None:
        if not panel.is_dir():
            raise ConfigError(f"panel {panel} does not exist and no DVC repository is around it")
        return {"panel_dir": str(panel.resolve()), "dvc_hash": None, "actions": ["as-is (no DVC repository)"]}
    rel = os.path.relpath(panel.resolve(), root.resolve())
    stage = stage_for_output(panel.resolve(), root)
    tracked = stage is not None or (root / f"{rel}.dvc").is_file()
    if not tracked:
        if not panel.is_dir():
            raise ConfigError(f"panel {panel} does not exist and no DVC stage or .dvc file tracks it")
        return {"panel_dir": str(panel.resolve()), "dvc_hash": None, "actions": ["as-is (not tracked by DVC)"]}
    recorded = versioning.dvc_revision(rel, repo=root)
    pulled = False
    if recorded:
        try:
            versioning.run_dvc(["pull", rel], repo=root, timeout=timeout)
            actions.append(f"dvc pull {rel}")
            pulled = True
        except versioning.DvcError as exc:
            log.info("dvc pull %s failed, reproducing instead: %s", rel, exc)
            actions.append(f"dvc pull {rel} (failed: not in the remote)")
    if stage is not None:
        proc = versioning.run_dvc(["repro", stage], repo=root, timeout=timeout)
        ran = "Running stage" in (proc.stdout or "") or "Running stage" in (proc.stderr or "")
        actions.append(f"dvc repro {stage}" + ("" if ran else " (up to date)"))
    elif not pulled:
        raise ConfigError(f"{rel}.dvc records a version the remote does not have, and no stage makes it")
    if push:
        versioning.run_dvc(["push", rel], repo=root, timeout=timeout)
        actions.append(f"dvc push {rel}")
    return {"panel_dir": str(panel.resolve()), "dvc_hash": versioning.dvc_revision(rel, repo=root),
            "actions": actions}


def remote_from_env(env: dict | None = None) -> tuple[str, str | None]:
    """``(remote URL, endpoint URL or None)`` from ``$DVC_REMOTE_URL`` and ``$S3_ENDPOINT_URL`` /
    ``$AWS_ENDPOINT_URL`` (ConfigMap ``hescape-config`` sets them on the cluster)."""
    env = os.environ if env is None else env
    url = env.get(ENV_REMOTE_URL)
    if not url:
        raise ConfigError(f"fetching a panel by hash needs a DVC remote: set {ENV_REMOTE_URL} (s3://bucket/prefix "
                          "or a directory)")
    endpoint = next((env[k] for k in ENV_ENDPOINTS if env.get(k)), None)
    return url, endpoint


def fetch_panel(dvc_hash: str, out: str | os.PathLike, *, remote_url: str | None = None, endpoint: str | None = None,
                workdir: str | os.PathLike | None = None, timeout: float | None = None) -> Path:
    """Pull the panel version ``dvc_hash`` (``<md5>.dir``) from a DVC remote into ``out``.

    Parameters
    ----------
    dvc_hash
        The directory hash DVC recorded (``dvc.lock``: ``outs[].md5``).
    out
        Directory to create (replaced when it holds another version).
    remote_url, endpoint
        The DVC remote (``s3://bucket/prefix``, a local directory, ...) and an S3 endpoint; default
        :func:`remote_from_env`.
    workdir
        Where the throw-away DVC project lives (default: ``<out>.dvc-fetch-<random>`` beside ``out``);
        removed afterwards, also when the fetch fails.
    """
    if not dvc_hash or not dvc_hash.endswith(".dir"):
        raise ConfigError(f"fetch_panel: expected a DVC directory hash '<md5>.dir', got {dvc_hash!r}")
    if remote_url is None:
        remote_url, env_endpoint = remote_from_env()
        endpoint = endpoint or env_endpoint
    out = Path(out).resolve()
    marker = out.with_name(out.name + ".dvc-hash")  # beside the panel: the panel holds only its own files
    if _holds(out, marker, dvc_hash):
        log.info("panel %s already holds %s", out, dvc_hash)
        return out
    # Its own project per fetch (several RayJobs may fetch into one shared volume at once).
    project = (Path(workdir) if workdir is not None
               else out.with_name(f"{out.name}.dvc-fetch-{uuid.uuid4().hex[:12]}"))
    if project.exists():
        shutil.rmtree(project)
    project.mkdir(parents=True)
    try:
        if "://" not in remote_url:
            remote_url = str(Path(remote_url).resolve())
        versioning.run_dvc(["init", "--no-scm", "-q"], repo=project, timeout=timeout)
        versioning.run_dvc(["remote", "add", "-d", REMOTE_NAME, remote_url], repo=project, timeout=timeout)
        if endpoint:
            versioning.run_dvc(["remote", "modify", REMOTE_NAME, "endpointurl", endpoint], repo=project,
                               timeout=timeout)
        name = "panel"
        (project / f"{name}.dvc").write_text(yaml.safe_dump({"outs": [{"md5": dvc_hash, "path": name,
                                                                        "hash": "md5"}]}))
        versioning.run_dvc(["pull", f"{name}.dvc"], repo=project, timeout=timeout)
        if _holds(out, marker, dvc_hash):  # a concurrent fetch of the same version finished first
            log.info("panel %s: %s arrived meanwhile; keeping it", out, dvc_hash)
            return out
        try:
            # A copy (not DVC's link into its cache) so that the throw-away project and its cache can go.
            with atomic_dir(out, overwrite=True) as tmp:
                shutil.copytree(project / name, tmp, dirs_exist_ok=True)
        except OSError:
            # Lost a race with a concurrent fetch for the directory: fine if it brought this version.
            if _holds(out, marker, dvc_hash, wait_s=10.0):
                return out
            raise
        with atomic_file(marker) as fh:
            fh.write(dvc_hash + "\n")
    finally:
        shutil.rmtree(project, ignore_errors=True)
    log.info("fetched panel %s into %s", dvc_hash, out)
    return out


def _holds(out: Path, marker: Path, dvc_hash: str, *, wait_s: float = 0.0) -> bool:
    """Whether ``out`` is a panel directory whose marker names ``dvc_hash`` (waiting up to ``wait_s``
    seconds for the marker a concurrent fetch writes right after its directory)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if out.is_dir() and marker.read_text().strip() == dvc_hash:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
