"""The bodies of the HESCAPE KFP components: thin wrappers around :mod:`hescape.orchestration.steps`.

KFP ships each function's source alone (no module globals) to the step, so every body imports what
it uses, and only ``hescape`` (installed in the component image and in the project's venv, which
``kfp.local`` runs the steps on). The typed artifacts are the hand-over in the KFP UI; the data
itself stays where the platform keeps it: the panel in DVC, runs and checkpoints in MLflow.

No ``from __future__ import annotations`` here: KFP reads the annotations as types.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output


def curate(panel: str, execution_mode: str, panel_dvc_hash: str, dataset: Output[Dataset]) -> str:
    """Pull the curated panel with DVC (``dvc repro`` + ``dvc push`` when the remote lacks it; by its
    hash in cluster mode) and validate it like ``hescape inspect``. Returns the panel name."""
    import json

    from hescape.orchestration import steps

    steps.log_to_stdout()
    info = steps.curate(panel, mode=execution_mode, dvc_hash=panel_dvc_hash)
    with open(dataset.path, "w") as f:
        json.dump(info["summary"], f, indent=2)
    for key in ("panel", "panel_dir", "name", "content_hash", "dvc_hash", "n_spots", "n_genes"):
        dataset.metadata[key] = info[key] if info[key] is not None else ""
    dataset.metadata["actions"] = "; ".join(info["actions"])
    print(f"curated panel {info['name']} ({info['n_spots']} spots, {info['n_genes']} genes), "
          f"DVC {info['dvc_hash']}: {'; '.join(info['actions'])}")
    return info["name"]


def preprocess(dataset: Input[Dataset], execution_mode: str, params_file: str, shards: Output[Dataset]):
    """Training shards of the panel (``hescape preprocess``): decoded patches, counts, train statistics."""
    import json

    from hescape.orchestration import steps

    steps.log_to_stdout()
    info = steps.preprocess(dataset.metadata["panel"], mode=execution_mode, dvc_hash=dataset.metadata["dvc_hash"],
                            params_file=params_file)
    with open(shards.path, "w") as f:
        json.dump(info, f, indent=2)
    shards.metadata.update(info)
    print(f"shards {info['shards_dir']}: {info['sizes']}")


def tune(dataset: Input[Dataset], execution_mode: str, params_file: str, experiment: str, image_encoder: str,
         gene_encoder: str, loss: str, strategy: str, train_overrides: str, trials: int, in_process: bool,
         pipeline_run: str,
         namespace: str, rayjob_template: str, ray_image: str, worker_replicas: int, gpus_per_worker: int,
         rayjob_timeout_s: int, cluster_overrides: str) -> str:
    """``hescape tune`` for one grid entry; returns its best parameters as a JSON list of overrides."""
    import json

    from hescape.orchestration import steps

    steps.log_to_stdout()
    entry = steps.grid_overrides(image_encoder, gene_encoder, loss, strategy)
    overrides = [*steps.parse_list(train_overrides), *entry]
    if experiment:
        overrides.append(f"train.experiment={experiment}")
    cluster = steps.ClusterSettings(namespace=namespace, template=rayjob_template, image=ray_image,
                                    worker_replicas=worker_replicas, gpus_per_worker=gpus_per_worker,
                                    timeout_s=rayjob_timeout_s, pipeline_run=pipeline_run, params_file=params_file,
                                    overrides=steps.parse_list(cluster_overrides))
    best = steps.tune(dataset.metadata["panel"], study=steps.study_name(dataset.metadata["name"], entry),
                      trials=trials, mode=execution_mode, dvc_hash=dataset.metadata["dvc_hash"],
                      params_file=params_file, overrides=overrides, in_process=in_process, cluster=cluster)
    print(f"best parameters: {best}")
    return json.dumps(best)


def pretrain(dataset: Input[Dataset], shards: Input[Dataset], execution_mode: str, params_file: str,
             experiment: str, image_encoder: str, gene_encoder: str, loss: str, strategy: str, train_overrides: str,
             tuned_overrides: str, in_process: bool, pipeline_run: str, namespace: str, rayjob_template: str,
             ray_image: str, worker_replicas: int, gpus_per_worker: int, rayjob_timeout_s: int,
             cluster_overrides: str, model: Output[Model], metrics: Output[Metrics]) -> str:
    """One contrastive pretraining run (``hescape train``) of a grid entry; returns its MLflow run id.

    Local mode trains here (local Ray); cluster mode runs the same CLI in a KubeRay RayJob.
    """
    import json

    from hescape.orchestration import steps

    steps.log_to_stdout()
    overrides = [*steps.parse_list(train_overrides), *steps.grid_overrides(image_encoder, gene_encoder, loss, strategy),
                 *steps.parse_list(tuned_overrides)]
    if experiment:
        overrides.append(f"train.experiment={experiment}")
    cluster = steps.ClusterSettings(namespace=namespace, template=rayjob_template, image=ray_image,
                                    worker_replicas=worker_replicas, gpus_per_worker=gpus_per_worker,
                                    timeout_s=rayjob_timeout_s, pipeline_run=pipeline_run, params_file=params_file,
                                    overrides=steps.parse_list(cluster_overrides))
    run = steps.pretrain(dataset.metadata["panel"], overrides, mode=execution_mode,
                         dvc_hash=dataset.metadata["dvc_hash"], params_file=params_file, in_process=in_process,
                         pipeline_run=pipeline_run, cluster=cluster)
    with open(model.path, "w") as f:
        json.dump({**run, "overrides": overrides}, f, indent=2)
    model.metadata.update({"run_id": run["run_id"], "run_name": run["run_name"],
                           "experiment_id": run["experiment_id"], "checkpoint_uri": run["checkpoint_uri"],
                           "image_encoder": image_encoder, "gene_encoder": gene_encoder, "loss": loss,
                           "strategy": strategy, "shards": shards.metadata.get("shards_dir", "")})
    for name in ("best_val_loss", "best_score", "best_epoch"):
        if name in run["metrics"]:
            metrics.log_metric(name, float(run["metrics"][name]))
    print(f"MLflow run {run['run_id']} ({run['run_name']}), best checkpoint {run['checkpoint_uri']}")
    return run["run_id"]


def evaluate(dataset: Input[Dataset], model: Input[Model], execution_mode: str, params_file: str,
             evaluate_overrides: str, pipeline_run: str, namespace: str, rayjob_template: str, ray_image: str,
             worker_replicas: int, gpus_per_worker: int, rayjob_timeout_s: int, cluster_overrides: str,
             metrics: Output[Metrics]) -> str:
    """``hescape evaluate --run RUN_ID`` (here, or in a RayJob); logs the headline metrics it added to
    the run and returns the run id."""
    from hescape.orchestration import steps

    steps.log_to_stdout()
    run_id = model.metadata["run_id"]
    cluster = steps.ClusterSettings(namespace=namespace, template=rayjob_template, image=ray_image,
                                    worker_replicas=worker_replicas, gpus_per_worker=gpus_per_worker,
                                    timeout_s=rayjob_timeout_s, pipeline_run=pipeline_run, params_file=params_file,
                                    overrides=steps.parse_list(cluster_overrides))
    result = steps.evaluate(run_id, mode=execution_mode, panel=dataset.metadata["panel"],
                            dvc_hash=dataset.metadata["dvc_hash"], params_file=params_file,
                            overrides=steps.parse_list(evaluate_overrides), cluster=cluster)
    for name, value in sorted(result["metrics"].items()):
        metrics.log_metric(name, float(value))
    metrics.metadata["run_id"] = run_id
    print(f"evaluated {run_id}: {len(result['metrics'])} metrics")
    return run_id


def report(dataset: Input[Dataset], run_ids: list, experiment: str, report_dir: str, params_file: str,
           report_overrides: str, report_html: Output[HTML], report_md: Output[Markdown]) -> str:
    """``hescape report`` over the experiment; the report also becomes the HTML and Markdown artifacts."""
    import shutil

    from hescape.orchestration import steps

    steps.log_to_stdout()
    name = experiment or f"hescape/{dataset.metadata['name']}"
    info = steps.report(name, report_dir, run_ids=list(run_ids), params_file=params_file,
                        overrides=steps.parse_list(report_overrides))
    shutil.copyfile(info["html"], report_html.path)
    shutil.copyfile(info["md"], report_md.path)
    report_html.metadata["path"] = info["html"]
    report_md.metadata["path"] = info["md"]
    print(f"report of {name} ({len(run_ids)} runs): {info['html']}")
    return info["html"]


def register(run_ids: list, select_metric: str, select_direction: str, pipeline_run: str,
             model: Output[Model]) -> str:
    """Register the best run's best checkpoint in the MLflow model registry with the alias ``champion``."""
    import json

    from hescape.orchestration import steps

    steps.log_to_stdout()
    info = steps.register(list(run_ids), metric=select_metric, direction=select_direction, pipeline_run=pipeline_run)
    with open(model.path, "w") as f:
        json.dump(info, f, indent=2)
    model.metadata.update(info)
    print(f"registered {info['uri']} = version {info['version']} (run {info['run_id']}, "
          f"{info['metric']} {info['value']:.4g})")
    return info["uri"]


def cleanup_rayjobs(execution_mode: str, namespace: str, pipeline_run: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: delete every RayJob labelled with this pipeline run (cluster mode), whatever the
    pipeline's outcome; reports the final state."""
    from hescape.orchestration import steps

    steps.log_to_stdout()
    deleted = steps.cleanup(mode=execution_mode, namespace=namespace, pipeline_run=pipeline_run)
    print(f"pipeline {status.pipeline_job_resource_name}: {status.state}; RayJobs deleted: {deleted or 'none'}")
