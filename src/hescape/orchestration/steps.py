"""The pipeline's steps as plain functions: what each KFP component calls.

Every step takes ``mode``: ``"local"`` runs it in this process (the library, local Ray, MLflow from
``$MLFLOW_TRACKING_URI``, the repository's DVC remote); ``"cluster"`` runs the heavy steps (tune,
pretrain, evaluate) as a KubeRay RayJob that executes the same ``hescape`` CLI, waits for it with a
deadline and always deletes it. Light steps (curate, preprocess, report, register) run where the
component runs. Results come back as plain dicts, which the components turn into KFP artifacts.

Every RayJob's head and worker pods mount the shared data volume (PVC ``hescape-data`` of
``k8s/base``) at :data:`CLUSTER_DATA_ROOT`, and cluster-mode commands keep all their files there
(:data:`CLUSTER_SHARED_OVERRIDES`, unless an override of the run sets the same key): the fetched
panel, the shards, the frozen-feature cache and Ray Train's storage, which the Ray Train workers on
other pods open by the same absolute paths (they are also what ``checkpoint.json`` records for the
evaluation job).

MLflow is the hand-over between steps: pretrain returns the run id (read from the job's output in
cluster mode, the CLI's last line), evaluate logs its metrics to that run, report and register
read the runs.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hescape.errors import ConfigError, HescapeError

log = logging.getLogger(__name__)

LOCAL, CLUSTER = "local", "cluster"
MODES = (LOCAL, CLUSTER)

# Inside the Ray images: the working directory, its params.yaml.
CLUSTER_APP_DIR = "/app"
CLUSTER_PARAMS_FILE = "/app/params.yaml"
# The shared data volume of every RayJob pod (PVC hescape-data, k8s/rayjob/rayjob-template.yaml):
# where the panels are fetched to, and the defaults of every path a cluster-mode command writes
# that other pods read (Ray Train workers open the shards and the feature cache, and write
# checkpoints to the storage path).
CLUSTER_DATA_ROOT = "/app/data"
CLUSTER_PANEL_ROOT = f"{CLUSTER_DATA_ROOT}/panels"
CLUSTER_SHARED_OVERRIDES = (
    f"preprocess.out_dir={CLUSTER_DATA_ROOT}/shards",
    f"train.cache_dir={CLUSTER_DATA_ROOT}/cache",
    f"train.storage_path={CLUSTER_DATA_ROOT}/ray",
)

TAG_PIPELINE_RUN = "hescape.pipeline_run"
CHAMPION_ALIAS = "champion"
FALLBACK_METRIC = ("best_val_loss", "min")  # logged by every training run

_RUN_ID_LINE = re.compile(r"^\s*([0-9a-f]{32})\s*$")
# The evaluation's headline numbers (of the best checkpoint): Recall@k in both retrieval protocols,
# the expression probe's mean Pearson r, the slide-label probe's AUROC.
HEADLINE_METRICS = re.compile(r"^test_best_((batch|global)_(i2g|g2i)_R_at_\d+|expr_\w*mean|slide_\w*auroc)$")
BEST_PARAMS_BEGIN = "=== hescape best params begin ==="
BEST_PARAMS_END = "=== hescape best params end ==="


def log_to_stdout(level: int = logging.INFO) -> None:
    """Show the library's log records (RayJob status changes, DVC actions) in the step's log."""
    import sys

    logger = logging.getLogger("hescape")
    logger.setLevel(level)
    if not any(getattr(h, "_hescape_step", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._hescape_step = True
        logger.addHandler(handler)
        logger.propagate = False


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"execution_mode {mode!r}: expected one of {list(MODES)}")
    return mode


def parse_list(value) -> list[str]:
    """A list of ``key=value`` overrides from a list or its JSON text (``""`` = none)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"expected a JSON list of overrides, got {value!r}") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"expected a list of 'key=value' strings, got {value!r}")
    return list(value)


def grid_overrides(image_encoder: str, gene_encoder: str, loss: str, strategy: str) -> list[str]:
    """The ``train.*`` overrides of one grid entry."""
    return [f"train.image_encoder={image_encoder}", f"train.gene_encoder={gene_encoder}", f"train.loss={loss}",
            f"train.strategy={strategy}"]


def _set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _cli(args: list[str]) -> None:
    """Run ``hescape <args>`` in this process; a non-zero status raises."""
    from hescape.cli import main

    log.info("hescape %s", shlex.join(args))
    rc = main(list(args))
    if rc:
        raise HescapeError(f"`hescape {shlex.join(args)}` exited with status {rc}")


def _mlflow_client():
    from mlflow.tracking import MlflowClient

    from hescape import tracking

    return MlflowClient(tracking.tracking_uri())


# ------------------------------------------------------------------------------------------------
# Cluster mode: settings and the RayJob around one CLI command
# ------------------------------------------------------------------------------------------------

@dataclass
class ClusterSettings:
    """How cluster-mode steps run their RayJob (pipeline parameters; ``""``/``-1`` keep the template's).

    ``overrides`` (``pipeline.cluster_overrides``) apply to every cluster-mode command, after
    :data:`CLUSTER_SHARED_OVERRIDES`, which they can replace key by key.
    ``custom_api``/``core_api`` are Kubernetes API clients (default: from the service account).
    """

    namespace: str = "hescape"
    template: str = "hescape-train-template"
    image: str = ""
    worker_replicas: int = -1
    gpus_per_worker: int = -1
    timeout_s: float = 6 * 3600
    poll_s: float = 10.0
    ttl_seconds_after_finished: int = 300
    active_deadline_seconds: int = 86400
    pipeline_run: str = ""
    params_file: str = CLUSTER_PARAMS_FILE
    overrides: list[str] = field(default_factory=list)
    custom_api: object = field(default=None, repr=False)
    core_api: object = field(default=None, repr=False)


def cluster_overrides(*groups: list[str] | None) -> list[str]:
    """The ``--set`` overrides of a cluster-mode command: :data:`CLUSTER_SHARED_OVERRIDES` (files on
    the shared volume) except those whose key one of ``groups`` sets, then ``groups`` in order (a
    later override wins, as in :func:`hescape.config.apply_overrides`)."""
    given = [item for group in groups for item in (group or [])]
    keys = {item.split("=", 1)[0].strip() for item in given}
    return [*(item for item in CLUSTER_SHARED_OVERRIDES if item.split("=", 1)[0] not in keys), *given]


def cluster_panel_path(panel: str) -> str:
    """Where RayJobs fetch ``panel`` to: the same absolute path on the shared volume for every job of
    a run, so the paths a training run records (MLflow tags) hold in the evaluation job too."""
    return f"{CLUSTER_PANEL_ROOT}/{Path(panel).name}"


def cluster_entrypoint(cli_args: list[str], *, panel: str, dvc_hash: str, then: str = "") -> str:
    """The RayJob entrypoint: fetch the panel version by its DVC hash, then ``hescape <cli_args>``."""
    if not dvc_hash:
        raise ConfigError("cluster mode needs the panel's DVC hash (pipeline parameter panel_dvc_hash): "
                          "`make data` (dvc repro + push), then compile/submit again")
    fetch = ["hescape", "pipeline", "fetch-panel", "--hash", dvc_hash, "--out", cluster_panel_path(panel)]
    command = f"cd {CLUSTER_APP_DIR} && {shlex.join(fetch)} && {shlex.join(['hescape', *cli_args])}"
    return f"{command} && {then}" if then else command


def run_cli_as_rayjob(step: str, entrypoint: str, cluster: ClusterSettings, *, token: str = ""):
    """Build the RayJob of ``entrypoint`` from the template, run it to the end, delete it."""
    from hescape.orchestration import rayjob

    template = rayjob.load_template(cluster.template, namespace=cluster.namespace, custom_api=cluster.custom_api)
    labels = {rayjob.LABEL_STEP: step}
    if cluster.pipeline_run:
        labels[rayjob.LABEL_PIPELINE_RUN] = cluster.pipeline_run
    options = rayjob.RayJobOptions(
        image=cluster.image or None,
        worker_replicas=None if cluster.worker_replicas < 0 else cluster.worker_replicas,
        gpus_per_worker=None if cluster.gpus_per_worker < 0 else cluster.gpus_per_worker,
        ttl_seconds_after_finished=cluster.ttl_seconds_after_finished,
        active_deadline_seconds=cluster.active_deadline_seconds,
        labels=labels,
    )
    job = rayjob.build_rayjob(template, name=rayjob.rayjob_name(step, token), entrypoint=entrypoint,
                              namespace=cluster.namespace, options=options)
    return rayjob.run_rayjob(job, timeout_s=cluster.timeout_s, poll_s=cluster.poll_s, custom_api=cluster.custom_api,
                             core_api=cluster.core_api)


def run_id_from_logs(logs: str) -> str | None:
    """The last line of ``logs`` that is an MLflow run id (``hescape train`` prints it last)."""
    found = None
    for line in logs.splitlines():
        match = _RUN_ID_LINE.match(line)
        if match:
            found = match.group(1)
    return found


def _run_id_by_name(run_name: str) -> str | None:
    client = _mlflow_client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(experiments, filter_string=f"tags.`mlflow.runName` = '{run_name}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------

def _panel_for_step(panel: str, mode: str, dvc_hash: str) -> Path:
    """The panel directory this process can read: the repository's in local mode; in cluster mode a
    copy fetched by its DVC hash into ``.scratch/panels/<name>`` under the working directory (never
    over a DVC workspace's own copy)."""
    if mode == LOCAL:
        return Path(panel)
    from hescape.orchestration.data import fetch_panel

    if not dvc_hash:
        raise ConfigError("cluster mode needs the panel's DVC hash (pipeline parameter panel_dvc_hash)")
    return fetch_panel(dvc_hash, Path(".scratch/panels") / Path(panel).name)


def curate(panel: str, *, mode: str = LOCAL, dvc_hash: str = "", check_images: bool = True) -> dict:
    """Bring the curated panel in (DVC pull, or repro + push when the remote lacks it; by hash in
    cluster mode) and validate it like ``hescape inspect``.

    Returns the panel's summary plus ``panel`` (as given), ``panel_dir``, ``dvc_hash``, ``actions``.
    """
    from hescape.data.panel import summarize, validate_panel

    check_mode(mode)
    if mode == LOCAL:
        from hescape.orchestration.data import pull_or_repro

        info = pull_or_repro(panel)
        if dvc_hash and info["dvc_hash"] and dvc_hash != info["dvc_hash"]:
            log.warning("panel %s is now at %s; the pipeline was compiled with %s", panel, info["dvc_hash"], dvc_hash)
    else:
        path = _panel_for_step(panel, mode, dvc_hash)
        info = {"panel_dir": str(path.resolve()), "dvc_hash": dvc_hash, "actions": [f"fetched {dvc_hash}"]}
    loaded, report = validate_panel(info["panel_dir"], check_images=check_images)
    summary = summarize(loaded)
    summary["warnings"] = list(report.warnings)
    out = {"panel": panel, **info, "name": summary["name"], "content_hash": summary["content_hash"],
           "n_spots": int(summary["n_spots"]), "n_genes": int(summary["n_genes"]), "summary": summary}
    return json.loads(json.dumps(out, default=str))


def preprocess(panel: str, *, mode: str = LOCAL, dvc_hash: str = "", params_file: str = "",
               overrides: list[str] | None = None) -> dict:
    """Build (or reuse) the panel's training shards, like ``hescape preprocess``; returns their
    directory, split sizes, image size and gene count. In cluster mode the shards are a check in the
    component's pod: training jobs rebuild them next to their own copy of the panel."""
    from hescape.config import apply_overrides, load_params, section
    from hescape.data.shards import PreprocessConfig, Shards, build_shards

    check_mode(mode)
    path = _panel_for_step(panel, mode, dvc_hash)
    params = apply_overrides(load_params(params_file or None), overrides or [])
    root = build_shards(path, section(params, "preprocess", PreprocessConfig), progress=False)
    shards = Shards(root)
    return {"shards_dir": str(Path(root).resolve()), "sizes": dict(shards.manifest["sizes"]),
            "image_size": int(shards.image_size), "n_genes": len(shards.genes)}


def read_best_params(text_or_path) -> list[str]:
    """``train.*`` overrides from what ``hescape tune`` writes (``tune.best_params_out``): a mapping of
    dotted keys, a nested mapping (``{train: {...}}``) or a list of ``key=value`` strings."""
    import yaml

    from hescape.tracking import flatten

    text = Path(text_or_path).read_text() if isinstance(text_or_path, Path) else str(text_or_path)
    data = yaml.safe_load(text)
    if data is None:
        return []
    if isinstance(data, list):
        return parse_list(data)
    if not isinstance(data, dict):
        raise ConfigError(f"best params: expected a mapping or a list, got {data!r}")
    for key in ("overrides", "best_params"):  # a wrapper around the overrides
        if key in data and isinstance(data[key], (dict, list)):
            return read_best_params(json.dumps(data[key]))
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            flat[key] = value
    out = []
    for key, value in flat.items():
        key = key if "." in key else f"train.{key}"
        out.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    return out


def study_name(experiment: str, overrides: list[str]) -> str:
    """A study name per grid entry, e.g. ``hescape-simulated-mlp-efficientnet_lite0-clip-frozen``."""
    values = dict(item.split("=", 1) for item in overrides if "=" in item)
    parts = [values.get(f"train.{k}", "") for k in ("gene_encoder", "image_encoder", "loss", "strategy")]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join([experiment or "hescape", *filter(None, parts)])).strip("-")


def tune(panel: str, *, study: str, trials: int, mode: str = LOCAL, dvc_hash: str = "", params_file: str = "",
         overrides: list[str] | None = None, storage: str = "", in_process: bool = False,
         cluster: ClusterSettings | None = None) -> list[str]:
    """Run ``hescape tune`` for one grid entry and return its best parameters as ``train.*`` overrides.

    The study's storage is ``storage``, else ``$OPTUNA_STORAGE_URL`` (set on the cluster), else
    ``tune.storage``; ``in_process`` (local mode) trains the trials without Ray (``--local``).
    """
    check_mode(mode)
    overrides = list(overrides or [])
    args = ["tune", "--panel", None, "--study", study, "--trials", str(int(trials))]
    if storage:
        args += ["--storage", storage]
    if mode == LOCAL:
        out = Path("runs/tune") / study / "best_params.yaml"  # tune.best_params_out's default place
        args[2] = panel
        _cli([*args, *(["--params", params_file] if params_file else []), "--best-params-out", str(out.resolve()),
              *_set_args(overrides), *(["--local"] if in_process else [])])
        if not out.is_file():
            raise HescapeError(f"hescape tune wrote no best parameters to {out}")
        return read_best_params(out)
    cluster = cluster or ClusterSettings()
    out = f"/tmp/hescape-tune/{study}.best.yaml"
    args[2] = cluster_panel_path(panel)
    args += ["--params", cluster.params_file, "--best-params-out", out,
             *_set_args(cluster_overrides(cluster.overrides, overrides))]
    then = f"echo {shlex.quote(BEST_PARAMS_BEGIN)} && cat {shlex.quote(out)} && echo {shlex.quote(BEST_PARAMS_END)}"
    result = run_cli_as_rayjob("tune", cluster_entrypoint(args, panel=panel, dvc_hash=dvc_hash, then=then), cluster,
                               token=study)
    text = result.logs
    if BEST_PARAMS_BEGIN not in text or BEST_PARAMS_END not in text:
        raise HescapeError(f"RayJob {result.name}: no best parameters in its output:\n{text[-4000:]}")
    block = text.rsplit(BEST_PARAMS_BEGIN, 1)[1].split(BEST_PARAMS_END, 1)[0]
    return read_best_params(block)


def run_summary(run_id: str) -> dict:
    """``run_id``, ``run_name``, ``experiment_id``, ``artifact_uri``, ``checkpoint_uri`` (best
    checkpoint) and the latest value of every metric of an MLflow run."""
    run = _mlflow_client().get_run(run_id)
    return {"run_id": run_id, "run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
            "status": run.info.status, "artifact_uri": run.info.artifact_uri,
            "checkpoint_uri": f"{run.info.artifact_uri}/checkpoints/best", "metrics": dict(run.data.metrics),
            "tags": {k: v for k, v in run.data.tags.items() if k.startswith("hescape.")}}


def pretrain(panel: str, overrides: list[str] | None = None, *, mode: str = LOCAL, dvc_hash: str = "",
             params_file: str = "", in_process: bool = False, pipeline_run: str = "",
             cluster: ClusterSettings | None = None) -> dict:
    """One training run (``hescape train``) of a grid entry; returns :func:`run_summary` of its MLflow run.

    Local mode calls :func:`hescape.train.run.train_run` here (Ray Train on a local Ray, or the plain
    loop with ``in_process``). Cluster mode runs ``hescape train`` in a RayJob and takes the run id
    from the job's output (the CLI's last line), else from MLflow by the job's unique run name.
    """
    from hescape.config import apply_overrides, load_params, section
    from hescape.train.config import TrainConfig

    check_mode(mode)
    overrides = list(overrides or [])
    if mode == LOCAL:
        from hescape.train.run import train_run

        params = apply_overrides(load_params(params_file or None), overrides)
        extra = {TAG_PIPELINE_RUN: pipeline_run} if pipeline_run else None
        run_id = train_run(panel, params, local=in_process, progress=False, extra_tags=extra)
    else:
        cluster = cluster or ClusterSettings()
        all_overrides = cluster_overrides(cluster.overrides, overrides)
        try:
            base = section(apply_overrides(load_params(params_file or None), all_overrides), "train",
                           TrainConfig).run_name
        except (ConfigError, OSError):
            base = "train"
        run_name = f"{base}-{uuid.uuid4().hex[:8]}"  # unique: MLflow finds the run by it if the log does not
        args = ["train", "--params", cluster.params_file, "--panel", cluster_panel_path(panel),
                *_set_args(all_overrides), "--run-name", run_name, "--no-progress"]
        result = run_cli_as_rayjob("train", cluster_entrypoint(args, panel=panel, dvc_hash=dvc_hash), cluster,
                                   token=run_name)
        run_id = run_id_from_logs(result.logs) or _run_id_by_name(run_name)
        if run_id is None:
            raise HescapeError(f"RayJob {result.name} succeeded but its output names no MLflow run id and no run is "
                               f"named {run_name}:\n{result.logs[-4000:]}")
        if pipeline_run:
            _mlflow_client().set_tag(run_id, TAG_PIPELINE_RUN, pipeline_run)
    return run_summary(run_id)


def evaluate(run_id: str, *, mode: str = LOCAL, panel: str = "", dvc_hash: str = "", params_file: str = "",
             overrides: list[str] | None = None, cluster: ClusterSettings | None = None) -> dict:
    """``hescape evaluate --run RUN_ID`` (here, or in a RayJob); returns the headline metrics the
    evaluation added to the run (``metrics``; :data:`HEADLINE_METRICS`), everything it added
    (``added_metrics``) and all of the run's metrics (``all_metrics``)."""
    check_mode(mode)
    before = run_summary(run_id)["metrics"]
    if mode == LOCAL:
        _cli(["evaluate", "--run", run_id, *(["--params", params_file] if params_file else []),
              *_set_args(overrides or [])])
    else:
        cluster = cluster or ClusterSettings()
        args = ["evaluate", "--run", run_id, "--params", cluster.params_file,
                *_set_args(cluster_overrides(cluster.overrides, overrides))]
        run_cli_as_rayjob("evaluate", cluster_entrypoint(args, panel=panel, dvc_hash=dvc_hash), cluster,
                          token=run_id[:12])
    after = run_summary(run_id)
    added = {k: v for k, v in after["metrics"].items() if k not in before or before[k] != v}
    headline = {k: v for k, v in added.items() if HEADLINE_METRICS.match(k)}
    return {"run_id": run_id, "metrics": headline or added, "added_metrics": added, "all_metrics": after["metrics"],
            "checkpoint_uri": after["checkpoint_uri"]}


def report(experiment: str, out_dir: str, *, run_ids: list[str] | None = None, params_file: str = "",
           overrides: list[str] | None = None) -> dict:
    """``hescape report --experiment NAME --out DIR``; returns the paths of report.html / report.md."""
    out = Path(out_dir)
    _cli(["report", "--experiment", experiment, "--out", str(out), *(["--params", params_file] if params_file else []),
          *_set_args(overrides or [])])
    html, md = out / "report.html", out / "report.md"
    missing = [p.name for p in (html, md) if not p.is_file()]
    if missing:
        raise HescapeError(f"hescape report wrote no {', '.join(missing)} in {out}")
    return {"out_dir": str(out.resolve()), "html": str(html.resolve()), "md": str(md.resolve()),
            "experiment": experiment, "run_ids": list(run_ids or [])}


def select_best(run_ids: list[str], metric: str, direction: str = "max") -> tuple[str, str, float, str]:
    """The best run of ``run_ids`` by ``metric`` (``max``/``min``); falls back to the lowest
    ``best_val_loss`` when no run has ``metric``. Returns (run id, metric, value, direction)."""
    if direction not in ("max", "min"):
        raise ConfigError(f"select direction {direction!r}: expected 'max' or 'min'")
    if not run_ids:
        raise ConfigError("no runs to choose from")
    client = _mlflow_client()
    metrics = {rid: client.get_run(rid).data.metrics for rid in run_ids}
    candidates = [(metric, direction)] + ([FALLBACK_METRIC] if metric != FALLBACK_METRIC[0] else [])
    for name, how in candidates:
        scored = [(rid, m[name]) for rid, m in metrics.items() if name in m]
        if scored:
            if name != metric:
                log.warning("no run has metric %r; choosing by %s (%s)", metric, name, how)
            best = (max if how == "max" else min)(scored, key=lambda item: item[1])
            return best[0], name, float(best[1]), how
    raise HescapeError(f"none of the runs {run_ids} has metric {metric!r} or {FALLBACK_METRIC[0]!r}")


def register(run_ids: list[str], *, metric: str, direction: str = "max", model_name: str = "",
             alias: str = CHAMPION_ALIAS, pipeline_run: str = "") -> dict:
    """Register the best run's best checkpoint in the MLflow model registry and point ``alias`` at it.

    MLflow 3's ``register_model("runs:/...")`` accepts only logged models, so the version is created
    from the checkpoint's artifact URI with the run linked (``create_model_version(source, run_id)``).
    """
    from mlflow.exceptions import MlflowException

    from hescape import tracking

    model_name = model_name or tracking.REGISTERED_MODEL
    run_id, chosen_metric, value, how = select_best(run_ids, metric, direction)
    summary = run_summary(run_id)
    client = _mlflow_client()
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="HESCAPE dual encoder (image + gene towers, heads)")
    tags = {"hescape.select_metric": chosen_metric, "hescape.select_value": repr(value),
            "hescape.select_direction": how, "hescape.candidates": ",".join(run_ids)}
    if pipeline_run:
        tags[TAG_PIPELINE_RUN] = pipeline_run
    version = client.create_model_version(model_name, summary["checkpoint_uri"], run_id=run_id, tags=tags)
    for _ in range(60):
        status = client.get_model_version(model_name, version.version).status
        if status != "PENDING_REGISTRATION":
            break
        time.sleep(1)
    client.set_registered_model_alias(model_name, alias, version.version)
    return {"model_name": model_name, "version": str(version.version), "alias": alias, "run_id": run_id,
            "source": summary["checkpoint_uri"], "metric": chosen_metric, "value": value, "direction": how,
            "uri": f"models:/{model_name}@{alias}"}


def cleanup(*, mode: str, namespace: str = "hescape", pipeline_run: str = "", custom_api=None) -> list[str]:
    """The exit handler: in cluster mode delete every RayJob labelled with this pipeline run."""
    from hescape.orchestration import rayjob

    check_mode(mode)
    if mode == LOCAL or not pipeline_run:
        return []
    selector = f"{rayjob.LABEL_PIPELINE_RUN}={rayjob.label_value(pipeline_run)}"
    return rayjob.delete_rayjobs(selector, namespace=namespace, custom_api=custom_api)
