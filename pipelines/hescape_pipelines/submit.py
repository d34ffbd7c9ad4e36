"""Submit the benchmark pipeline to a Kubeflow Pipelines server (what ``make pipeline`` ends with).

The package is compiled for cluster mode: the steps run on ``$HESCAPE_COMPONENT_IMAGE``, read
``/app/params.yaml`` (baked into the images from the same repository), fetch the panel version of
``dvc.lock`` from the cluster's DVC remote, and run training and evaluation as RayJobs built from
``$HESCAPE_RAYJOB_TEMPLATE`` in ``$HESCAPE_K8S_NAMESPACE`` on ``$HESCAPE_RAY_IMAGE``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_RAY_IMAGE = "HESCAPE_RAY_IMAGE"
ENV_NAMESPACE = "HESCAPE_K8S_NAMESPACE"
ENV_TEMPLATE = "HESCAPE_RAYJOB_TEMPLATE"
IMAGE_PARAMS_FILE = "/app/params.yaml"
DEFAULT_PACKAGE = "runs/pipeline/hescape-benchmark.yaml"


def submit_arguments(cfg, env: Mapping[str, str] | None = None) -> dict:
    """Pipeline arguments of a cluster run: cluster mode, the images' params file, and the Ray image,
    namespace and RayJob template from the environment (else the ``pipeline`` block)."""
    env = os.environ if env is None else env
    return {
        "execution_mode": "cluster",
        "params_file": IMAGE_PARAMS_FILE,
        "ray_image": env.get(ENV_RAY_IMAGE) or cfg.ray_image,
        "namespace": env.get(ENV_NAMESPACE) or cfg.namespace,
        "rayjob_template": env.get(ENV_TEMPLATE) or cfg.rayjob_template,
    }


def submit(host: str, params_file: str | os.PathLike = "params.yaml", *, package: str | os.PathLike = DEFAULT_PACKAGE,
           experiment: str = "hescape", run_name: str | None = None, env: Mapping[str, str] | None = None,
           client=None) -> dict:
    """Compile the pipeline for cluster mode and start a run of it on the KFP server at ``host``.

    Returns ``run_id``, ``url`` (the run in the Kubeflow UI), ``package``, ``arguments``.
    """
    import time

    from hescape_components import component_image

    from hescape import versioning
    from hescape.config import load_params
    from hescape.errors import ConfigError
    from hescape.orchestration.config import pipeline_config
    from hescape_pipelines.benchmark import compile_pipeline

    cfg = pipeline_config(load_params(params_file))
    arguments = submit_arguments(cfg, env)
    dvc_hash = versioning.dvc_revision(cfg.panel)
    if not dvc_hash:
        raise ConfigError(f"{cfg.panel} has no DVC version in dvc.lock: run `make data` (dvc repro + dvc push to the "
                          "cluster's remote) first")
    arguments["panel_dvc_hash"] = dvc_hash
    compile_pipeline(cfg, str(package), image=component_image(), panel_dvc_hash=dvc_hash,
                     params_file=IMAGE_PARAMS_FILE)
    if client is None:
        import kfp

        client = kfp.Client(host=host)
    client.create_experiment(name=experiment, description="HESCAPE benchmark runs")
    run = client.create_run_from_pipeline_package(
        str(package), arguments=arguments, run_name=run_name or f"hescape-benchmark-{time.strftime('%Y%m%d-%H%M%S')}",
        experiment_name=experiment, enable_caching=False)
    return {"run_id": run.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}",
            "package": str(Path(package).resolve()), "arguments": arguments}
