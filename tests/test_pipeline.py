"""The KFP benchmark pipeline: compile (``hescape pipeline compile``), its YAML, the ``pipeline`` block,
the DVC data step, and a tiny end-to-end ``kfp.local`` run.

Everything is real: the KFP compiler, DVC on a temporary project with a local remote, MLflow on
SQLite, kfp.local's subprocess runner on this interpreter, the project's simulator. Nothing is
mocked here (the cluster mode's Kubernetes API is exercised in test_rayjob.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from hescape import versioning
from hescape.cli import main
from hescape.config import load_params
from hescape.errors import ConfigError
from hescape.io import sha256_file
from hescape.orchestration.config import PipelineConfig, pipeline_config
from hescape.orchestration.project import add_pipeline_paths

REPO = Path(__file__).resolve().parents[1]
add_pipeline_paths(REPO)

COMPONENTS = ("curate", "preprocess", "tune", "pretrain", "evaluate", "report", "register", "cleanup-rayjobs")
GRID = [
    {"image_encoder": "efficientnet_lite0", "gene_encoder": "mlp", "loss": "clip", "strategy": "frozen"},
    {"image_encoder": "vit_tiny", "gene_encoder": "drvi", "loss": "siglip", "strategy": "lora"},
]
IMAGE = "registry.example.org/hescape/component:1.2.3"


@pytest.fixture
def hermetic_dvc(tmp_path, monkeypatch):
    """Keep DVC's user/system config and site cache out of the tests."""
    for var, sub in (("DVC_GLOBAL_CONFIG_DIR", "dvc-global"), ("DVC_SYSTEM_CONFIG_DIR", "dvc-system"),
                     ("DVC_SITE_CACHE_DIR", "dvc-site-cache")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("HESCAPE_PARAMS", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))


def write_params(path: Path, pipeline: dict, **blocks) -> Path:
    path.write_text(yaml.safe_dump({**blocks, "pipeline": pipeline}, sort_keys=False))
    return path


def compile_yaml(tmp_path, monkeypatch, *, tune: bool, extra: list[str] | None = None) -> dict:
    monkeypatch.setenv("HESCAPE_COMPONENT_IMAGE", IMAGE)
    params = write_params(tmp_path / "params.yaml", {"grid": GRID, "tune": tune, "tune_trials": 3, "parallelism": 2,
                                                     "train_overrides": ["train.epochs=3"]})
    out = tmp_path / "out" / "pipeline.yaml"
    assert main(["pipeline", "compile", "--out", str(out), "--params", str(params), *(extra or [])]) == 0
    pipeline_spec, *platform_specs = yaml.safe_load_all(out.read_text())  # the pipeline, then its platform spec
    for spec in platform_specs:
        pipeline_spec.update(spec)
    return pipeline_spec


def root_parameters(doc: dict) -> dict:
    return doc["root"]["inputDefinitions"]["parameters"]


def all_tasks(doc: dict) -> dict:
    tasks = dict(doc["root"]["dag"]["tasks"])
    for comp in doc["components"].values():
        tasks.update((comp.get("dag") or {}).get("tasks") or {})
    return tasks


def test_compiled_yaml_holds_every_component_the_grid_and_the_parameters(tmp_path, monkeypatch):
    doc = compile_yaml(tmp_path, monkeypatch, tune=True)
    assert doc["pipelineInfo"]["name"] == "hescape-benchmark"
    executors = doc["deploymentSpec"]["executors"]
    assert {f"exec-{c}" for c in COMPONENTS} <= set(executors)
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == IMAGE, name
        command = " ".join(container["command"])
        assert "pip install" not in command, f"{name} installs packages at run time"
        assert "kfp.dsl.executor_main" in command
    # Typed artifacts.
    outputs = {name: c.get("outputDefinitions", {}) for name, c in doc["components"].items()}
    assert outputs["comp-curate"]["artifacts"]["dataset"]["artifactType"]["schemaTitle"] == "system.Dataset"
    assert outputs["comp-pretrain"]["artifacts"]["model"]["artifactType"]["schemaTitle"] == "system.Model"
    assert outputs["comp-pretrain"]["artifacts"]["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["comp-evaluate"]["artifacts"]["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["comp-report"]["artifacts"]["report_html"]["artifactType"]["schemaTitle"] == "system.HTML"
    assert outputs["comp-report"]["artifacts"]["report_md"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert outputs["comp-register"]["artifacts"]["model"]["artifactType"]["schemaTitle"] == "system.Model"
    # Pipeline parameters with the params.yaml defaults.
    params = root_parameters(doc)
    for name in ("panel", "panel_dvc_hash", "execution_mode", "params_file", "experiment", "train_overrides",
                 "tune_trials", "select_metric", "select_direction", "report_dir", "namespace", "rayjob_template",
                 "ray_image", "worker_replicas", "gpus_per_worker", "rayjob_timeout_s", "cluster_overrides"):
        assert name in params, name
    assert params["panel"]["defaultValue"] == "data/panels/simulated"
    assert params["execution_mode"]["defaultValue"] == "local"
    assert params["tune_trials"]["defaultValue"] == 3
    assert json.loads(params["train_overrides"]["defaultValue"]) == ["train.epochs=3"]
    assert params["rayjob_template"]["defaultValue"] == "hescape-train-template"
    # The grid: a static ParallelFor list, at most `parallelism` at once.
    loops = [t for t in all_tasks(doc).values() if "parameterIterator" in t]
    assert len(loops) == 1
    assert json.loads(loops[0]["parameterIterator"]["items"]["raw"]) == GRID
    assert loops[0]["iteratorPolicy"]["parallelismLimit"] == 2
    # Report and register collect the evaluated run ids; the exit handler always runs.
    tasks = all_tasks(doc)
    assert "tune" in tasks and "for-loop-2" in str(doc)
    cleanup = doc["root"]["dag"]["tasks"]["cleanup-rayjobs"]
    assert cleanup["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert "exit-handler-1" in cleanup["dependentTasks"]
    for name in ("report", "register"):
        assert tasks[name]["inputs"]["parameters"]["run_ids"]["taskOutputParameter"]["producerTask"] == "for-loop-2"


def test_compiled_yaml_carries_the_kubeflow_pod_settings(tmp_path, monkeypatch):
    doc = compile_yaml(tmp_path, monkeypatch, tune=True)
    k8s = doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in COMPONENTS:
        spec = k8s[f"exec-{name}"]
        assert spec["configMapAsEnv"][0]["configMapName"] == "hescape-config", name
        mapped = {e["envVar"] for e in spec["configMapAsEnv"][0]["keyToEnv"]}
        assert {"MLFLOW_TRACKING_URI", "DVC_REMOTE_URL", "S3_ENDPOINT_URL"} <= mapped, name
        assert {s["secretName"] for s in spec["secretAsEnv"]} >= {"hescape-s3"}, name
        assert spec["podMetadata"]["labels"]["hescape.io/s3-client"] == "true", name
    assert k8s["exec-tune"]["podMetadata"]["labels"]["hescape.io/postgres-client"] == "true"
    assert "hescape-postgres" in {s["secretName"] for s in k8s["exec-tune"]["secretAsEnv"]}
    resources = doc["deploymentSpec"]["executors"]["exec-preprocess"]["container"]["resources"]
    assert resources["cpuLimit"] and resources["memoryLimit"]


def test_tuning_is_a_compile_time_choice_and_cluster_defaults(tmp_path, monkeypatch):
    doc = compile_yaml(tmp_path, monkeypatch, tune=False, extra=["--cluster"])
    assert "exec-tune" not in doc["deploymentSpec"]["executors"]
    assert "tune" not in all_tasks(doc)
    params = root_parameters(doc)
    assert params["execution_mode"]["defaultValue"] == "cluster"
    assert params["params_file"]["defaultValue"] == "/app/params.yaml"


def test_the_repositorys_pipeline_block_builds_and_selects_the_headline_metric():
    import ast
    import importlib.util

    cfg = pipeline_config(load_params(REPO / "params.yaml"))
    assert 1 <= len(cfg.grid) <= 4, "make run must stay under 10 minutes on a laptop"
    assert cfg.execution_mode == "local"
    # hescape.evaluate.run.HEADLINE, read without importing the evaluation stack (seconds of imports).
    source = Path(importlib.util.find_spec("hescape.evaluate.run").origin).read_text()
    headline = next(node.value.value for node in ast.parse(source).body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "HEADLINE" for t in node.targets))
    assert PipelineConfig().select_metric == headline


@pytest.mark.parametrize("block, message", [
    ({"execution_mode": "k8s"}, "execution_mode"),
    ({"grid": []}, "grid is empty"),
    ({"grid": [{"image_encoder": "x", "loss": "clip", "temperature": 1}]}, "temperature"),
    ({"select_direction": "up"}, "select_direction"),
    ({"train_overrides": ["train.epochs"]}, "key=value"),
])
def test_bad_pipeline_blocks_fail_with_the_key(block, message):
    with pytest.raises(ConfigError, match=message):
        pipeline_config({"pipeline": block})


def test_submit_reads_the_cluster_settings_from_the_environment(tmp_path):
    from hescape_pipelines.submit import submit, submit_arguments

    cfg = PipelineConfig()
    args = submit_arguments(cfg, {"HESCAPE_RAY_IMAGE": "hescape/ray-cpu:dev", "HESCAPE_K8S_NAMESPACE": "ml",
                                  "HESCAPE_RAYJOB_TEMPLATE": "my-template"})
    assert args == {"execution_mode": "cluster", "params_file": "/app/params.yaml", "ray_image": "hescape/ray-cpu:dev",
                    "namespace": "ml", "rayjob_template": "my-template"}
    assert submit_arguments(cfg, {})["namespace"] == "hescape"
    # Without a DVC version of the panel there is nothing a cluster could fetch: refused before any client call.
    params = write_params(tmp_path / "params.yaml", {"panel": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="make data"):
        submit("http://localhost:8080", params, package=tmp_path / "p.yaml", client=object())


def test_submit_help_is_what_pipeline_up_checks(capsys):
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "submit", "--help"])
    assert info.value.code == 0
    assert "--host" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Data: pull-or-repro in a DVC project, fetch by hash without one
# ------------------------------------------------------------------------------------------------

TINY_SIMULATE = {"seed": 3, "name": "tiny", "n_spots": 300, "n_samples": 6, "n_donors": 4, "n_genes": 30,
                 "patch_px": 32}
DVC_YAML = textwrap.dedent("""\
    stages:
      simulate:
        cmd: hescape simulate --out data/panels/tiny --overwrite
        params:
          - simulate
        outs:
          - data/panels/tiny
""")


def dvc_project(root: Path, pipeline: dict | None = None, **blocks) -> Path:
    """A DVC project (no git) with the simulate stage of a tiny panel and a local default remote."""
    root.mkdir(parents=True, exist_ok=True)
    write_params(root / "params.yaml", pipeline or {}, simulate=TINY_SIMULATE, **blocks)
    (root / "dvc.yaml").write_text(DVC_YAML)
    versioning.run_dvc(["init", "--no-scm", "-q"], repo=root)
    versioning.run_dvc(["remote", "add", "-d", "local", str(root.parent / f"{root.name}-store")], repo=root)
    return root


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def test_curate_reproduces_when_the_remote_lacks_the_panel_and_pulls_when_it_has_it(tmp_path, hermetic_dvc,
                                                                                 monkeypatch):
    from hescape.orchestration import steps

    project = dvc_project(tmp_path / "proj")
    monkeypatch.chdir(project)
    first = steps.curate("data/panels/tiny", mode="local")
    assert first["actions"] == ["dvc repro simulate", "dvc push data/panels/tiny"]
    assert first["name"] == "tiny" and first["n_spots"] == 300 and first["dvc_hash"].endswith(".dir")
    files = tree(project / "data/panels/tiny")
    shutil.rmtree(project / "data/panels/tiny")
    shutil.rmtree(project / ".dvc/cache")
    second = steps.curate("data/panels/tiny", mode="local", dvc_hash=first["dvc_hash"])
    assert second["actions"] == ["dvc pull data/panels/tiny", "dvc repro simulate (up to date)",
                                 "dvc push data/panels/tiny"]
    assert second["dvc_hash"] == first["dvc_hash"] and tree(project / "data/panels/tiny") == files

    # Cluster pods: the same version by its hash, from the remote alone (no git, no dvc.yaml).
    pod = tmp_path / "pod"
    pod.mkdir()
    monkeypatch.chdir(pod)
    out = pod / ".scratch" / "panels" / "tiny"
    assert main(["pipeline", "fetch-panel", "--hash", first["dvc_hash"], "--out", str(out),
                 "--remote", str(tmp_path / "proj-store")]) == 0
    assert tree(out) == files
    assert not (pod / ".scratch" / "panels" / "tiny.dvc-fetch").exists(), "the throw-away DVC project is removed"
    monkeypatch.setenv("DVC_REMOTE_URL", str(tmp_path / "proj-store"))
    info = steps.curate("data/panels/tiny", mode="cluster", dvc_hash=first["dvc_hash"])  # already there
    assert info["panel_dir"] == str(out) and info["content_hash"] == first["content_hash"]
    assert main(["pipeline", "fetch-panel", "--hash", "not-a-hash", "--out", str(out)]) == 2


# ------------------------------------------------------------------------------------------------
# The tiny pipeline end to end on kfp.local
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end_on_kfp_local(tmp_path, hermetic_dvc, monkeypatch):
    """curate (dvc repro + push) -> preprocess -> tune (1 trial) -> pretrain (1 epoch) -> evaluate -> report
    -> register, then the exit handler, all through kfp.local's subprocess runner. The tune branch is
    the one compiled in here; ``make run`` runs the default branch without it."""
    from hescape_pipelines.local import run_local
    from mlflow.tracking import MlflowClient

    from hescape import tracking

    pipeline = {"panel": "data/panels/tiny", "grid": GRID[:1], "tune": True, "tune_trials": 1, "in_process": True,
                "train_overrides": ["train.epochs=1"]}
    project = dvc_project(tmp_path / "proj", pipeline, preprocess={"image_size": 32},
                          train={"batch_size": 32, "num_workers": 1},
                          tune={"epochs": 1, "storage": "sqlite:///optuna.db"},
                          evaluate={"checkpoints": ["best"], "bootstrap": 20, "max_k": 10, "batch_keys": []},
                          report={"projection": "pca"})
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    monkeypatch.delenv("HESCAPE_ARTIFACT_ROOT", raising=False)
    # run_local points TMPDIR into .scratch/ and sets RAY_TMPDIR: both are restored after the test.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)

    result = run_local("params.yaml")

    assert Path(result["report_html"]).is_file() and Path(result["report_md"]).is_file()
    assert list((project / ".scratch" / "kfp-tmp").iterdir()), "kfp.local's task folders go to .scratch/"
    champion = result["champion"]
    assert champion and champion["uri"] == "models:/hescape-dual-encoder@champion"
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(champion["run_id"])
    assert run.data.tags["hescape.loss"] == "clip" and run.data.tags["hescape.pipeline_run"]
    assert "test_best_global_i2g_R_at_5" in run.data.metrics
    assert champion["source"].endswith("/checkpoints/best")
    assert champion["tags"]["hescape.select_metric"] == "test_best_global_i2g_R_at_5"
    assert (project / "runs/tune").is_dir(), "the tune branch ran"
    # The tuned values reached the final run (the study's best trial's parameters).
    best = yaml.safe_load(next((project / "runs/tune").rglob("best_params.yaml")).read_text())
    for item in best["overrides"]:
        key, value = item.split("=", 1)
        assert run.data.params[key] == str(yaml.safe_load(value)), key
    # The artifacts of each step are under the pipeline root.
    root = Path(result["pipeline_root"])
    for task in ("curate", "preprocess", "report", "register"):
        assert list(root.glob(f"*/{task}")) or list(root.glob(f"*/*/{task}")), task
    html = next(root.rglob("report/report_html"))
    assert html.read_text().lstrip().lower().startswith(("<!doctype", "<html"))
