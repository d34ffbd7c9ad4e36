"""The HESCAPE benchmark pipeline (KFP v2).

::

    cleanup-rayjobs (exit handler: deletes the run's RayJobs after success or failure)
    └── benchmark-runs
        curate ─> preprocess ─┐
                              └─> ParallelFor(grid) [ tune ─> ] pretrain ─> evaluate
                                                                  └─ Collected(run ids) ─> report
                                                                                         └> register

The grid of (image encoder, gene encoder, loss, strategy) and the choice to tune are read from the
``pipeline`` block of ``params.yaml`` when the pipeline is built (a static ``ParallelFor`` list and
a compile-time branch: ``kfp.local`` silently skips ``dsl.If`` on loop items and NamedTuple fields).
Everything else is a pipeline parameter whose default comes from the same block.

The grid runs inside a nested pipeline because ``kfp.local`` (2.17) cannot run a ``ParallelFor``
directly inside a ``dsl.ExitHandler`` ("Parent pipeline input argument 'loop-item-param-...' not
found"); wrapped in a nested pipeline it runs, on kfp.local and on Kubeflow alike.

On Kubeflow every step pod reads ``hescape-config`` (MLflow, S3, DVC remote) and the S3 keys by
name (kfp-kubernetes; ignored by kfp.local), and the steps that run RayJobs poll them with a
deadline; their service account (``pipeline-runner``) is bound to ``hescape-rayjob-manager``.

No ``from __future__ import annotations`` here: KFP reads the pipeline functions' annotations as types.
"""

import json

from kfp import dsl
from kfp import kubernetes as k8s

from hescape.orchestration.config import PipelineConfig

PIPELINE_NAME = "hescape-benchmark"
RUNS_PIPELINE_NAME = "hescape-benchmark-runs"

# Keys of ConfigMap hescape-config that step pods read as environment variables.
CONFIG_KEYS = ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE_URL", "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL",
               "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "DVC_REMOTE", "DVC_REMOTE_URL", "HESCAPE_NAMESPACE",
               "HESCAPE_RAYJOB_TEMPLATE", "MLFLOW_DISABLE_TELEMETRY", "RAY_USAGE_STATS_ENABLED", "DO_NOT_TRACK")
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# Step pod sizes on Kubeflow: (cpu request, cpu limit, memory request, memory limit). The heavy
# work of tune/pretrain/evaluate runs in the RayJob; their pods only wait for it.
SIZES = {
    "curate": ("500m", "2", "2G", "4G"),
    "preprocess": ("1", "2", "4G", "8G"),
    "tune": ("100m", "500m", "512M", "1G"),
    "pretrain": ("100m", "500m", "512M", "1G"),
    "evaluate": ("100m", "500m", "512M", "1G"),
    "report": ("500m", "2", "2G", "4G"),
    "register": ("100m", "1", "512M", "2G"),
    "cleanup": ("100m", "500m", "256M", "512M"),
}


def _cluster_pod(task: dsl.PipelineTask, size: str, *, postgres: bool = False) -> dsl.PipelineTask:
    """Kubeflow settings of a step: no caching (steps write to MLflow/DVC), pod size, the platform's
    settings and S3 keys by name, and the labels the network policies admit."""
    task.set_caching_options(False)
    cpu_req, cpu_lim, mem_req, mem_lim = SIZES[size]
    task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim).set_memory_request(mem_req).set_memory_limit(mem_lim)
    k8s.use_config_map_as_env(task, "hescape-config", {key: key for key in CONFIG_KEYS}, optional=True)
    k8s.use_secret_as_env(task, "hescape-s3", {key: key for key in S3_KEYS}, optional=True)
    k8s.add_pod_label(task, "hescape.io/s3-client", "true")
    if postgres:
        k8s.use_secret_as_env(task, "hescape-postgres", {"password": "PGPASSWORD"}, optional=True)
        k8s.add_pod_label(task, "hescape.io/postgres-client", "true")
    return task


def build_pipeline(cfg: PipelineConfig, *, image: str | None = None, panel_dvc_hash: str = "",
                   params_file: str = "params.yaml"):
    """The benchmark pipeline for ``cfg`` (grid and tuning fixed), its steps on ``image``.

    Parameters
    ----------
    cfg
        The ``pipeline`` block of params.yaml.
    image
        Component image (default ``$HESCAPE_COMPONENT_IMAGE`` or ``hescape/component:dev``).
    panel_dvc_hash
        Default of the ``panel_dvc_hash`` parameter: the panel version (``dvc.lock``) that cluster
        steps fetch.
    params_file
        Default of the ``params_file`` parameter: the params.yaml the steps read (``/app/params.yaml``
        inside the images).
    """
    from hescape_components import make_components

    c = make_components(image)
    grid = cfg.grid_items()
    tune_enabled = bool(cfg.tune)

    @dsl.pipeline(name=RUNS_PIPELINE_NAME, description="curate, preprocess, the grid's runs, report, register")
    def benchmark_runs(panel: str, panel_dvc_hash: str, execution_mode: str, params_file: str, experiment: str,
                       train_overrides: str, evaluate_overrides: str, report_overrides: str, tune_trials: int,
                       in_process: bool, select_metric: str, select_direction: str, report_dir: str, namespace: str,
                       rayjob_template: str, ray_image: str, worker_replicas: int, gpus_per_worker: int,
                       rayjob_timeout_s: int, cluster_overrides: str) -> str:
        # The run's id as each step sees it (a placeholder resolved by the step's launcher), the label
        # of its RayJobs and a tag of its MLflow runs.
        pipeline_run = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        cluster = {"pipeline_run": pipeline_run, "namespace": namespace, "rayjob_template": rayjob_template,
                   "ray_image": ray_image, "worker_replicas": worker_replicas, "gpus_per_worker": gpus_per_worker,
                   "rayjob_timeout_s": rayjob_timeout_s, "cluster_overrides": cluster_overrides}
        cur = _cluster_pod(c.curate(panel=panel, execution_mode=execution_mode, panel_dvc_hash=panel_dvc_hash),
                           "curate")
        cur.set_display_name("curate (DVC)")
        pre = _cluster_pod(c.preprocess(dataset=cur.outputs["dataset"], execution_mode=execution_mode,
                                        params_file=params_file), "preprocess")
        with dsl.ParallelFor(grid, parallelism=cfg.parallelism, name="grid") as entry:
            fields = {"image_encoder": entry.image_encoder, "gene_encoder": entry.gene_encoder, "loss": entry.loss,
                      "strategy": entry.strategy}
            if tune_enabled:
                tuned = _cluster_pod(c.tune(dataset=cur.outputs["dataset"], execution_mode=execution_mode,
                                            params_file=params_file, experiment=experiment,
                                            train_overrides=train_overrides, trials=tune_trials,
                                            in_process=in_process, **fields, **cluster),
                                     "tune", postgres=True)
                tuned.after(pre)
                tuned_overrides = tuned.output
            else:
                tuned_overrides = "[]"
            train = _cluster_pod(c.pretrain(dataset=cur.outputs["dataset"], shards=pre.outputs["shards"],
                                            execution_mode=execution_mode, params_file=params_file,
                                            experiment=experiment, train_overrides=train_overrides,
                                            tuned_overrides=tuned_overrides, in_process=in_process, **fields,
                                            **cluster), "pretrain")
            ev = _cluster_pod(c.evaluate(dataset=cur.outputs["dataset"], model=train.outputs["model"],
                                         execution_mode=execution_mode, params_file=params_file,
                                         evaluate_overrides=evaluate_overrides, **cluster),
                              "evaluate")
        rep = _cluster_pod(c.report(dataset=cur.outputs["dataset"], run_ids=dsl.Collected(ev.outputs["Output"]),
                                    experiment=experiment, report_dir=report_dir, params_file=params_file,
                                    report_overrides=report_overrides), "report")
        reg = _cluster_pod(c.register(run_ids=dsl.Collected(ev.outputs["Output"]), select_metric=select_metric,
                                      select_direction=select_direction, pipeline_run=pipeline_run), "register")
        reg.after(rep)
        return reg.outputs["Output"]

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="HESCAPE benchmark: curate (DVC), preprocess, [tune,] pretrain and evaluate each "
                              "(image encoder, gene encoder, loss, strategy) of the grid, report, register the best")
    def benchmark(panel: str = cfg.panel, panel_dvc_hash: str = panel_dvc_hash,
                  execution_mode: str = cfg.execution_mode, params_file: str = params_file,
                  experiment: str = cfg.experiment, train_overrides: str = json.dumps(cfg.train_overrides),
                  evaluate_overrides: str = json.dumps(cfg.evaluate_overrides),
                  report_overrides: str = json.dumps(cfg.report_overrides),
                  tune_trials: int = cfg.tune_trials, in_process: bool = cfg.in_process,
                  select_metric: str = cfg.select_metric, select_direction: str = cfg.select_direction,
                  report_dir: str = cfg.report_dir, namespace: str = cfg.namespace,
                  rayjob_template: str = cfg.rayjob_template, ray_image: str = cfg.ray_image,
                  worker_replicas: int = cfg.worker_replicas, gpus_per_worker: int = cfg.gpus_per_worker,
                  rayjob_timeout_s: int = cfg.rayjob_timeout_s,
                  cluster_overrides: str = json.dumps(cfg.cluster_overrides)):
        cleanup = _cluster_pod(c.cleanup_rayjobs(execution_mode=execution_mode, namespace=namespace,
                                                 pipeline_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER), "cleanup")
        with dsl.ExitHandler(cleanup, name="always-cleanup"):
            benchmark_runs(panel=panel, panel_dvc_hash=panel_dvc_hash, execution_mode=execution_mode,
                           params_file=params_file, experiment=experiment, train_overrides=train_overrides,
                           evaluate_overrides=evaluate_overrides, report_overrides=report_overrides,
                           tune_trials=tune_trials, in_process=in_process, select_metric=select_metric,
                           select_direction=select_direction, report_dir=report_dir, namespace=namespace,
                           rayjob_template=rayjob_template, ray_image=ray_image, worker_replicas=worker_replicas,
                           gpus_per_worker=gpus_per_worker, rayjob_timeout_s=rayjob_timeout_s,
                           cluster_overrides=cluster_overrides)

    return benchmark


def compile_pipeline(cfg: PipelineConfig, out: str, **kwargs) -> str:
    """Compile :func:`build_pipeline` to the YAML package ``out`` (what the Kubeflow UI uploads)."""
    import os
    from pathlib import Path

    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix or '.yaml'}")  # written whole, then renamed
    try:
        compiler.Compiler().compile(build_pipeline(cfg, **kwargs), package_path=str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return str(out)
