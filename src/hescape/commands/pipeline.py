"""The benchmark pipeline (KFP v2): compile it, run it locally, submit it to Kubeflow.

The grid of (image encoder, gene encoder, loss, strategy), tuning on/off and the defaults of every
pipeline parameter come from the ``pipeline`` block of params.yaml.

Examples::

    hescape pipeline compile --out runs/pipeline/hescape-benchmark.yaml   # upload in the Kubeflow UI
    hescape pipeline run-local                                           # kfp.local, local Ray, MLflow SQLite
    hescape pipeline run-local --set pipeline.tune=true --set pipeline.tune_trials=2
    hescape pipeline submit --host http://localhost:8080 --params params.yaml
    hescape pipeline fetch-panel --hash 0a2d...e1.dir --out /app/data/panels/simulated   # inside RayJobs

``submit`` reads HESCAPE_COMPONENT_IMAGE, HESCAPE_RAY_IMAGE, HESCAPE_K8S_NAMESPACE and
HESCAPE_RAYJOB_TEMPLATE (scripts/pipeline_up.sh sets them). ``fetch-panel`` pulls one panel version
from the DVC remote in $DVC_REMOTE_URL (endpoint $S3_ENDPOINT_URL) without a git checkout.
"""

from __future__ import annotations

import json

NAME = "pipeline"
HELP = "compile / run locally / submit the KFP benchmark pipeline"


def add_arguments(parser):
    sub = parser.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    comp = sub.add_parser("compile", help="write the compiled pipeline YAML (for the Kubeflow UI)")
    comp.add_argument("--out", required=True, help="YAML file to write, e.g. runs/pipeline/hescape-benchmark.yaml")
    comp.add_argument("--params", default="params.yaml", help="params file with the pipeline block (default params.yaml)")
    comp.add_argument("--image", help="component image (default $HESCAPE_COMPONENT_IMAGE or hescape/component:dev)")
    comp.add_argument("--cluster", action="store_true",
                      help="defaults for a cluster run: execution_mode=cluster, params_file=/app/params.yaml")

    loc = sub.add_parser("run-local", help="run the pipeline here with kfp.local (subprocess runner)")
    loc.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    loc.add_argument("--set", dest="overrides", action="append", default=[], metavar="pipeline.KEY=VALUE",
                     help="override a value of the pipeline block, e.g. pipeline.tune=true (repeatable)")
    loc.add_argument("--mode", choices=["local", "cluster"], default="local",
                     help="execution_mode of the steps (default local; cluster needs a kubeconfig)")
    loc.add_argument("--json", action="store_true", help="print the result as JSON")

    sm = sub.add_parser("submit", help="compile for cluster mode and start a run on a Kubeflow Pipelines server")
    sm.add_argument("--host", required=True, help="KFP API/UI URL, e.g. http://localhost:8080")
    sm.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    sm.add_argument("--experiment", default="hescape", help="KFP experiment (default hescape)")
    sm.add_argument("--run-name", help="KFP run name (default hescape-benchmark-<time>)")
    sm.add_argument("--package", default="runs/pipeline/hescape-benchmark.yaml", help="where the compiled YAML goes")

    fetch = sub.add_parser("fetch-panel", help="pull one panel version by its DVC hash (no git checkout needed)")
    fetch.add_argument("--hash", required=True, help="the panel's DVC directory hash, <md5>.dir (dvc.lock)")
    fetch.add_argument("--out", required=True, help="directory to write")
    fetch.add_argument("--remote", help="DVC remote URL (default $DVC_REMOTE_URL)")
    fetch.add_argument("--endpoint", help="S3 endpoint URL (default $S3_ENDPOINT_URL or $AWS_ENDPOINT_URL)")


def _load_cfg(params_file: str):
    from hescape.config import load_params
    from hescape.orchestration.config import pipeline_config

    return pipeline_config(load_params(params_file))


def run(args) -> int:
    if args.pipeline_command == "fetch-panel":
        from hescape.orchestration.data import fetch_panel

        out = fetch_panel(args.hash, args.out, remote_url=args.remote, endpoint=args.endpoint)
        print(out)
        return 0

    import dataclasses
    from pathlib import Path

    from hescape import versioning
    from hescape.orchestration.project import add_pipeline_paths

    add_pipeline_paths()
    if args.pipeline_command == "compile":
        from hescape_pipelines.benchmark import compile_pipeline

        cfg = _load_cfg(args.params)
        params_file = str(Path(args.params).resolve())
        if args.cluster:
            from hescape_pipelines.submit import IMAGE_PARAMS_FILE

            cfg, params_file = dataclasses.replace(cfg, execution_mode="cluster"), IMAGE_PARAMS_FILE
        out = compile_pipeline(cfg, args.out, image=args.image, panel_dvc_hash=versioning.dvc_revision(cfg.panel) or "",
                               params_file=params_file)
        print(f"compiled {len(cfg.grid)} grid entries (tune: {'on' if cfg.tune else 'off'}) into {out}")
        return 0
    if args.pipeline_command == "run-local":
        from hescape_pipelines.local import run_local

        result = run_local(args.params, overrides=args.overrides, mode=args.mode)
        if args.json:
            print(json.dumps(result, indent=2, default=str))
        else:
            print(summary(result))
        return 0
    if args.pipeline_command == "submit":
        from hescape_pipelines.submit import submit

        result = submit(args.host, args.params, package=args.package, experiment=args.experiment,
                        run_name=args.run_name)
        print(f"submitted run {result['run_id']} ({result['package']})")
        print(f"  Kubeflow UI: {result['url']}")
        return 0
    raise AssertionError(args.pipeline_command)


def summary(result: dict) -> str:
    """What a finished local run printed: where the report is and how to open MLflow."""
    head = (f"HESCAPE benchmark pipeline finished in {result['seconds']:.0f} s "
            f"({len(result['grid'])} grid entries, tuning {'on' if result['tune'] else 'off'}; "
            f"kfp.local artifacts under {result['pipeline_root']})")
    lines = [head, f"  report:     {result['report_html']}", f"              {result['report_md']}"]
    champ = result.get("champion")
    if champ:
        tags = champ["tags"]
        lines.append(f"  best model: {champ['uri']} = version {champ['version']} (run {champ['run_id']}, "
                     f"{tags.get('hescape.select_metric', '?')} {tags.get('hescape.select_value', '?')})")
    lines.append(f"  MLflow:     make mlflow-ui, then open http://127.0.0.1:5000  (store {result['tracking_uri']})")
    return "\n".join(lines)
