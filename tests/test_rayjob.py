"""Cluster mode of the pipeline: the RayJob object and its create / poll / delete cycle.

- The RayJob built from the template (the file, or the cluster's copy with server-side fields)
  validates against the KubeRay CRD schema in ``../shared/reference/kuberay-crds`` (unknown fields
  rejected, as in test_k8s_manifests.py; skipped when the folder is absent) and its pod templates
  as strict core PodTemplates, and it carries what the issue asks for.
- The create / poll / delete cycle runs against an in-memory stand-in for the Kubernetes API
  server: **the Kubernetes API (``CustomObjectsApi``, ``CoreV1Api``) is the one thing mocked here**,
  with ``create_autospec`` of the real client classes so every call matches their signatures.
  Everything else is real: the template file, the hescape CLI parser that checks the entrypoints,
  MLflow on SQLite for the run id hand-over.
- Cluster-mode commands keep every file that other pods of the RayJob open (panel, shards, feature
  cache, Ray Train storage) on the shared data volume that the template mounts at /app/data,
  unless a ``pipeline.cluster_overrides`` entry sets the same key; local mode is unchanged.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from unittest.mock import create_autospec

import kubernetes_validate
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from test_k8s_manifests import KUBERNETES_VERSION, _crd_errors, _crd_validators

from hescape.cli import build_parser
from hescape.config import apply_overrides, load_params
from hescape.orchestration import rayjob, steps

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_FILE = REPO / "k8s" / "rayjob" / "rayjob-template.yaml"
RUN_ID = "0123456789abcdef0123456789abcdef"
PARAMS_FILE = REPO / "params.yaml"
SHARED = {"preprocess.out_dir": "/app/data/shards", "train.cache_dir": "/app/data/cache",
          "train.storage_path": "/app/data/ray"}


@pytest.fixture(scope="module")
def crd(reference_dir):
    crd_dir = reference_dir / "kuberay-crds"
    if not crd_dir.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {crd_dir} (kept outside the repository)")
    return _crd_validators(crd_dir)


def template() -> dict:
    return yaml.safe_load(TEMPLATE_FILE.read_text())


def server_copy(doc: dict) -> dict:
    """The template as the API server returns it: server-side metadata and a status."""
    doc = copy.deepcopy(doc)
    doc["metadata"].update({"namespace": "hescape", "uid": "5a0c", "resourceVersion": "4711", "generation": 1,
                            "creationTimestamp": "2026-01-01T00:00:00Z",
                            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                            "managedFields": [{"manager": "kubectl"}]})
    doc["status"] = {"jobDeploymentStatus": "Suspended"}
    return doc


def gpu_options(**extra) -> rayjob.RayJobOptions:
    return rayjob.RayJobOptions(image="registry.example.org/hescape/ray-gpu:0.1.0", worker_replicas=3,
                                gpus_per_worker=2, ttl_seconds_after_finished=120, active_deadline_seconds=7200,
                                labels={rayjob.LABEL_PIPELINE_RUN: "run/42:x", rayjob.LABEL_STEP: "train"}, **extra)


def pod_templates(job: dict) -> list[tuple[str, dict]]:
    spec = job["spec"]
    out = [("head", spec["rayClusterSpec"]["headGroupSpec"]["template"])]
    out += [("worker", g["template"]) for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    out.append(("submitter", spec["submitterPodTemplate"]))
    return out


# ------------------------------------------------------------------------------------------------
# The RayJob object
# ------------------------------------------------------------------------------------------------

def test_built_rayjob_has_the_lifecycle_and_placement_fields():
    tpl = template()
    before = copy.deepcopy(tpl)
    name = rayjob.rayjob_name("train", "mlp-efficientnet_lite0-clip-frozen-s42-" + "x" * 40)
    job = rayjob.build_rayjob(tpl, name=name, entrypoint="hescape train --panel /app/data/panels/p",
                              namespace="hescape", options=gpu_options())
    assert tpl == before, "the template must not change"
    assert len(name) <= rayjob.MAX_NAME_LENGTH and name.startswith("hescape-train-mlp-")
    meta, spec = job["metadata"], job["spec"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert meta["name"] == name and meta["namespace"] == "hescape"
    assert meta["labels"][rayjob.LABEL_PIPELINE_RUN] == "run-42-x"  # a valid label value
    assert meta["labels"][rayjob.LABEL_MANAGED_BY] == rayjob.MANAGED_BY
    assert rayjob.TEMPLATE_LABEL not in meta["labels"]
    assert spec["suspend"] is False
    assert spec["entrypoint"] == "hescape train --panel /app/data/panels/p"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 120
    assert spec["activeDeadlineSeconds"] == 7200
    assert spec["submissionMode"] == "K8sJobMode"
    for role, pod in pod_templates(job):
        assert pod["spec"]["containers"][0]["image"] == "registry.example.org/hescape/ray-gpu:0.1.0", role
        assert pod["metadata"]["labels"][rayjob.LABEL_STEP] == "train", role
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
        c = group["template"]["spec"]["containers"][0]
        assert c["resources"]["requests"][rayjob.GPU_RESOURCE] == "2"
        assert c["resources"]["limits"][rayjob.GPU_RESOURCE] == "2"
        assert rayjob.GPU_TOLERATION in group["template"]["spec"]["tolerations"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert rayjob.GPU_RESOURCE not in head["containers"][0]["resources"]["limits"], "the head needs no GPU"
    assert "tolerations" not in head


def test_defaults_keep_the_templates_sizes_and_zero_gpus_removes_a_gpu_request():
    tpl = template()
    job = rayjob.build_rayjob(tpl, name="hescape-evaluate-abc", entrypoint="hescape evaluate --run x")
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"] == tpl["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_tpl = rayjob.build_rayjob(tpl, name="a", entrypoint="x", options=gpu_options())
    cpu = rayjob.build_rayjob(gpu_tpl, name="b", entrypoint="x", options=rayjob.RayJobOptions(gpus_per_worker=0))
    for group in cpu["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert rayjob.GPU_RESOURCE not in resources["requests"] and rayjob.GPU_RESOURCE not in resources["limits"]


@pytest.mark.parametrize("bad", ["Upper-Case", "x" * 48, "ends-with-", ""])
def test_bad_names_and_empty_entrypoints_are_refused(bad):
    with pytest.raises(Exception, match="RayJob name"):
        rayjob.build_rayjob(template(), name=bad, entrypoint="hescape train")
    with pytest.raises(Exception, match="entrypoint"):
        rayjob.build_rayjob(template(), name="ok", entrypoint="  ")


@pytest.mark.parametrize("source", ["file", "cluster"])
def test_built_rayjob_validates_against_the_kuberay_crd(crd, source):
    kube = FakeKube([])
    if source == "file":
        tpl = rayjob.load_template(str(TEMPLATE_FILE))
    else:
        kube.objects[rayjob.TEMPLATE_NAME] = server_copy(template())
        tpl = rayjob.load_template(rayjob.TEMPLATE_NAME, namespace="hescape", custom_api=kube.custom)
    job = rayjob.build_rayjob(tpl, name=rayjob.rayjob_name("train", "t"), entrypoint="hescape train --panel p",
                              options=gpu_options(tolerations=[{"key": "dedicated", "operator": "Equal",
                                                                "value": "ml", "effect": "NoSchedule"}],
                                                  node_selector={"nvidia.com/gpu.present": "true"}))
    assert not _crd_errors(crd, job)
    assert set(job["metadata"]) == {"name", "namespace", "labels"}, "no server-side metadata copied"
    assert "status" not in job
    errors = []
    for role, pod in pod_templates(job):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": pod}
        try:
            kubernetes_validate.validate(wrapped, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{role}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_crd_check_is_not_vacuous(crd):
    job = rayjob.build_rayjob(template(), name="hescape-train-x", entrypoint="hescape train")
    job["spec"]["ttlSecondAfterFinished"] = 3
    assert any("ttlSecondAfterFinished" in e for e in _crd_errors(crd, job))


def test_missing_template_in_the_cluster_is_a_clear_error():
    kube = FakeKube([])
    with pytest.raises(Exception, match="hescape-train-template"):
        rayjob.load_template(rayjob.TEMPLATE_NAME, namespace="hescape", custom_api=kube.custom)


# ------------------------------------------------------------------------------------------------
# The create / poll / delete cycle against a stand-in API server
# ------------------------------------------------------------------------------------------------

class FakeKube:
    """In-memory stand-in for the Kubernetes API server: RayJobs in a dict, a scripted sequence of
    statuses (one per read; an exception instance is raised instead), pods and their logs."""

    def __init__(self, statuses, *, logs=None, on_create=None, delete_error=None):
        self.custom = create_autospec(client.CustomObjectsApi, instance=True)
        self.core = create_autospec(client.CoreV1Api, instance=True)
        self.objects: dict[str, dict] = {}
        self.statuses = list(statuses)
        self.logs = logs or {}
        self.on_create = on_create
        self.delete_error = delete_error
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.log_reads: list[str] = []
        self.custom.create_namespaced_custom_object.side_effect = self._create
        self.custom.get_namespaced_custom_object.side_effect = self._get
        self.custom.delete_namespaced_custom_object.side_effect = self._delete
        self.custom.list_namespaced_custom_object.side_effect = self._list
        self.core.list_namespaced_pod.side_effect = self._pods
        self.core.read_namespaced_pod_log.side_effect = self._log

    @staticmethod
    def _check(group, version, plural):
        assert (group, version, plural) == ("ray.io", "v1", "rayjobs")

    def _create(self, group, version, namespace, plural, body, **kwargs):
        self._check(group, version, plural)
        name = body["metadata"]["name"]
        if name in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.objects[name] = copy.deepcopy(body)
        self.created.append(copy.deepcopy(body))
        if self.on_create:
            self.on_create(body)
        return body

    def _get(self, group, version, namespace, plural, name, **kwargs):
        self._check(group, version, plural)
        if name not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        obj = self.objects[name]
        if name != rayjob.TEMPLATE_NAME and self.statuses:
            step = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            if isinstance(step, Exception):
                raise step
            deployment, job_status, *extra = step
            obj["status"] = {"jobDeploymentStatus": deployment, "rayClusterName": f"{name}-raycl",
                             **({"jobStatus": job_status} if job_status else {}), **(extra[0] if extra else {})}
        return copy.deepcopy(obj)

    def _delete(self, group, version, namespace, plural, name, **kwargs):
        self._check(group, version, plural)
        if self.delete_error is not None:
            raise self.delete_error
        if name not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        del self.objects[name]
        self.deleted.append(name)

    def _list(self, group, version, namespace, plural, **kwargs):
        self._check(group, version, plural)
        key, value = kwargs["label_selector"].split("=", 1)
        return {"items": [copy.deepcopy(o) for o in self.objects.values()
                          if (o["metadata"].get("labels") or {}).get(key) == value]}

    def _pods(self, namespace, **kwargs):
        selector = kwargs["label_selector"]
        if selector.startswith("job-name="):
            pod, container = selector.split("=", 1)[1] + "-7xk2p", "ray-job-submitter"
        elif "ray.io/node-type=head" in selector:
            pod, container = "raycluster-head-abcde", "ray-head"
        else:
            return client.V1PodList(items=[])
        return client.V1PodList(items=[client.V1Pod(metadata=client.V1ObjectMeta(name=pod),
                                                    spec=client.V1PodSpec(containers=[client.V1Container(name=container)]))])

    def _log(self, name, namespace, **kwargs):
        self.log_reads.append(kwargs["container"])
        return self.logs.get(kwargs["container"], "")


def make_job(name="hescape-train-t1"):
    return rayjob.build_rayjob(template(), name=name, entrypoint="hescape train --panel p", namespace="hescape",
                               options=rayjob.RayJobOptions(labels={rayjob.LABEL_PIPELINE_RUN: "run-1"}))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def run(kube, job, timeout_s=600.0):
    clock = Clock()
    return rayjob.run_rayjob(job, timeout_s=timeout_s, poll_s=10, custom_api=kube.custom, core_api=kube.core,
                             sleep=clock.sleep, clock=clock)


SUBMITTER_LOG = f"Job submitted\nINFO training...\n{RUN_ID}\n------\nJob 'raysubmit_1' succeeded\n------"


def test_success_returns_the_job_output_and_deletes_the_rayjob():
    kube = FakeKube([("Initializing", None), ("Running", "RUNNING"), ("Running", "RUNNING"),
                     ("Complete", "SUCCEEDED")], logs={"ray-job-submitter": SUBMITTER_LOG, "ray-head": "head"})
    result = run(kube, make_job())
    assert result.name == "hescape-train-t1" and result.status["jobStatus"] == "SUCCEEDED"
    assert steps.run_id_from_logs(result.logs) == RUN_ID
    assert kube.deleted == ["hescape-train-t1"] and not kube.objects
    assert kube.log_reads == ["ray-job-submitter"], "a successful job needs only the submitter's output"
    body = kube.custom.delete_namespaced_custom_object.call_args.kwargs["body"]
    assert body == {"propagationPolicy": "Foreground"}


def test_failure_surfaces_reason_and_logs_and_deletes_the_rayjob():
    kube = FakeKube([("Running", "RUNNING"), ("Failed", "FAILED", {"reason": "AppFailed",
                                                                  "message": "Job failed with exit code 2"})],
                    logs={"ray-job-submitter": "Traceback ...\nConfigError: bad train.loss",
                          "ray-head": "raylet: worker died"})
    with pytest.raises(rayjob.RayJobFailed) as info:
        run(kube, make_job())
    text = str(info.value)
    assert "AppFailed" in text and "exit code 2" in text
    assert "ConfigError: bad train.loss" in text and "raylet: worker died" in text
    assert info.value.status["jobDeploymentStatus"] == "Failed"
    assert kube.deleted == ["hescape-train-t1"]
    assert set(kube.log_reads) == {"ray-job-submitter", "ray-head"}


def test_validation_failed_and_deadline_exceeded_are_failures():
    for status in [("ValidationFailed", None, {"reason": "ValidationFailed"}),
                   ("Failed", "RUNNING", {"reason": "DeadlineExceeded"}),
                   ("Complete", "STOPPED")]:
        kube = FakeKube([status])
        with pytest.raises(rayjob.RayJobFailed):
            run(kube, make_job())
        assert kube.deleted == ["hescape-train-t1"], status


def test_timeout_raises_with_logs_and_deletes_the_rayjob():
    kube = FakeKube([("Initializing", None)], logs={"ray-job-submitter": "", "ray-head": "waiting for workers"})
    with pytest.raises(rayjob.RayJobTimeout) as info:
        run(kube, make_job(), timeout_s=60)
    assert "not finished after 60 s" in str(info.value) and "waiting for workers" in str(info.value)
    assert kube.deleted == ["hescape-train-t1"]
    assert kube.custom.get_namespaced_custom_object.call_count == 7  # t = 0, 10, ..., 60


def test_transient_api_errors_are_retried_and_a_vanished_job_fails():
    kube = FakeKube([ApiException(status=503), ApiException(status=500), ("Complete", "SUCCEEDED")],
                    logs={"ray-job-submitter": SUBMITTER_LOG})
    assert run(kube, make_job()).status["jobDeploymentStatus"] == "Complete"
    kube = FakeKube([ApiException(status=404)])
    with pytest.raises(rayjob.RayJobFailed, match="disappeared"):
        run(kube, make_job())
    with pytest.raises(ApiException):
        run(FakeKube([ApiException(status=503)] * 6), make_job())


def test_a_failed_delete_never_hides_the_outcome_and_a_failed_create_deletes_nothing():
    kube = FakeKube([("Complete", "SUCCEEDED")], logs={"ray-job-submitter": SUBMITTER_LOG},
                    delete_error=ApiException(status=500))
    assert run(kube, make_job()).name == "hescape-train-t1"
    kube = FakeKube([("Failed", "FAILED")], delete_error=ApiException(status=500))
    with pytest.raises(rayjob.RayJobFailed):
        run(kube, make_job())
    kube = FakeKube([])
    kube.objects["hescape-train-t1"] = {"metadata": {"name": "hescape-train-t1"}}
    with pytest.raises(ApiException):
        run(kube, make_job())
    assert kube.deleted == [] and "hescape-train-t1" in kube.objects, "someone else's RayJob must stay"


def test_exit_handler_deletes_every_rayjob_of_the_pipeline_run():
    kube = FakeKube([])
    for name, run_label in (("hescape-train-a", "run-1"), ("hescape-evaluate-b", "run-1"), ("other", "run-2")):
        kube.objects[name] = make_job(name)
        kube.objects[name]["metadata"]["labels"][rayjob.LABEL_PIPELINE_RUN] = run_label
    deleted = steps.cleanup(mode="cluster", namespace="hescape", pipeline_run="run-1", custom_api=kube.custom)
    assert sorted(deleted) == ["hescape-evaluate-b", "hescape-train-a"]
    assert list(kube.objects) == ["other"]
    assert steps.cleanup(mode="local", pipeline_run="run-2", custom_api=kube.custom) == []
    assert list(kube.objects) == ["other"]


# ------------------------------------------------------------------------------------------------
# The steps' cluster mode: the same CLI inside the RayJob, the run id handed back through MLflow
# ------------------------------------------------------------------------------------------------

def cli_commands(entrypoint: str) -> list[list[str]]:
    """The ``hescape ...`` commands of an entrypoint (``a && b && c``)."""
    commands = [shlex.split(part) for part in entrypoint.split(" && ")]
    return [c[1:] for c in commands if c and c[0] == "hescape"]


def cluster_settings(kube, **extra) -> steps.ClusterSettings:
    return steps.ClusterSettings(namespace="hescape", template=str(TEMPLATE_FILE), image="hescape/ray-cpu:dev",
                                 worker_replicas=2, gpus_per_worker=0, timeout_s=3600, poll_s=1,
                                 pipeline_run="kfp-run-7", custom_api=kube.custom, core_api=kube.core,
                                 overrides=["train.storage_path=s3://ray/hescape"], **extra)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One MLflow SQLite store for the module (creating a store runs its migrations: seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("HESCAPE_ARTIFACT_ROOT", str(root / "mlartifacts"))
        yield root


def _mlflow_run(name: str | None = None) -> str:
    from mlflow.tracking import MlflowClient

    from hescape import tracking

    mlflow_client = MlflowClient(tracking.tracking_uri())
    experiment = tracking.get_or_create_experiment("hescape/tiny")
    run = mlflow_client.create_run(experiment, run_name=name)
    mlflow_client.log_metric(run.info.run_id, "best_val_loss", 1.25)
    mlflow_client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.mark.parametrize("hand_over", ["log", "run name"])
def test_pretrain_in_cluster_mode_runs_the_train_cli_in_a_rayjob(mlflow_store, hand_over):
    parser = build_parser()
    state = {}

    def job_runs(body):  # what the Ray cluster would do: `hescape train` creates an MLflow run
        commands = cli_commands(body["spec"]["entrypoint"])
        args = parser.parse_args(commands[-1])
        state["run_id"] = _mlflow_run(args.run_name)
        state["commands"] = commands
        kube.logs["ray-job-submitter"] = state["run_id"] if hand_over == "log" else "no id printed"

    kube = FakeKube([("Running", "RUNNING"), ("Complete", "SUCCEEDED")], on_create=job_runs)
    overrides = steps.grid_overrides("efficientnet_lite0", "mlp", "siglip", "frozen")
    result = steps.pretrain("data/panels/tiny", overrides, mode="cluster", dvc_hash="abc123.dir",
                            pipeline_run="kfp-run-7", cluster=cluster_settings(kube))
    assert result["run_id"] == state["run_id"]
    assert result["checkpoint_uri"].endswith("/checkpoints/best") and result["metrics"]["best_val_loss"] == 1.25
    assert result["tags"][steps.TAG_PIPELINE_RUN] == "kfp-run-7"
    fetch, train = state["commands"]
    assert fetch == ["pipeline", "fetch-panel", "--hash", "abc123.dir", "--out", "/app/data/panels/tiny"]
    args = parser.parse_args(train)
    assert args.command == "train" and args.panel == "/app/data/panels/tiny" and args.params == "/app/params.yaml"
    # The shared-volume defaults, except the key the cluster override sets, then the run's own.
    assert args.overrides == ["preprocess.out_dir=/app/data/shards", "train.cache_dir=/app/data/cache",
                              "train.storage_path=s3://ray/hescape", *overrides]
    assert args.run_name.startswith("mlp-efficientnet_lite0-siglip-frozen-s42-")
    parser.parse_args(fetch)  # a valid command line of the same CLI
    job = kube.created[0]
    assert job["metadata"]["labels"][rayjob.LABEL_PIPELINE_RUN] == "kfp-run-7"
    assert job["metadata"]["labels"][rayjob.LABEL_STEP] == "train"
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == \
        "hescape/ray-cpu:dev"
    assert kube.deleted == [job["metadata"]["name"]]


def test_evaluate_in_cluster_mode_fetches_the_same_panel_path_and_surfaces_failures(mlflow_store):
    run_id = _mlflow_run()
    parser = build_parser()
    kube = FakeKube([("Failed", "FAILED", {"reason": "AppFailed"})],
                    logs={"ray-job-submitter": "hescape evaluate: error: no test split", "ray-head": ""})
    with pytest.raises(rayjob.RayJobFailed, match="no test split"):
        steps.evaluate(run_id, mode="cluster", panel="data/panels/tiny", dvc_hash="abc123.dir",
                       cluster=cluster_settings(kube))
    fetch, evaluate = cli_commands(kube.created[0]["spec"]["entrypoint"])
    assert fetch[-1] == "/app/data/panels/tiny", "the path the training job recorded"
    assert evaluate == ["evaluate", "--run", run_id, "--params", "/app/params.yaml",
                        "--set", "preprocess.out_dir=/app/data/shards", "--set", "train.cache_dir=/app/data/cache",
                        "--set", "train.storage_path=s3://ray/hescape"]
    assert parser.parse_args(evaluate).command == "evaluate"
    assert kube.deleted == [kube.created[0]["metadata"]["name"]]


def test_cluster_mode_needs_the_panel_hash(mlflow_store):
    kube = FakeKube([])
    with pytest.raises(Exception, match="panel_dvc_hash"):
        steps.pretrain("data/panels/tiny", [], mode="cluster", dvc_hash="", cluster=cluster_settings(kube))
    assert not kube.created


# ------------------------------------------------------------------------------------------------
# The shared data volume: where cluster-mode commands keep the files every pod of the RayJob opens
# ------------------------------------------------------------------------------------------------

def effective(overrides: list[str]) -> dict[str, object]:
    """The values of the shared-volume keys after ``overrides`` on the repository's params.yaml, as
    the CLI in the RayJob resolves them."""
    params = apply_overrides(load_params(str(PARAMS_FILE)), overrides)
    return {key: params[key.split(".")[0]][key.split(".")[1]] for key in SHARED}


def data_mounts() -> list[tuple[str, str]]:
    """``(pod, mount path of the hescape-data claim)`` of the template's head and worker pods."""
    found = []
    for role, pod in pod_templates(template()):
        if role == "submitter":
            continue
        names = {v["name"] for v in pod["spec"].get("volumes", [])
                 if (v.get("persistentVolumeClaim") or {}).get("claimName") == "hescape-data"}
        found += [(role, m["mountPath"]) for m in pod["spec"]["containers"][0].get("volumeMounts", [])
                  if m["name"] in names]
    return found


def test_cluster_paths_lie_on_the_volume_every_ray_pod_mounts():
    mounts = data_mounts()
    assert {role for role, _ in mounts} == {"head", "worker"}
    assert {path for _, path in mounts} == {steps.CLUSTER_DATA_ROOT} == {"/app/data"}
    assert dict(item.split("=", 1) for item in steps.CLUSTER_SHARED_OVERRIDES) == SHARED
    for path in [steps.CLUSTER_PANEL_ROOT, steps.cluster_panel_path("data/panels/tiny"), *SHARED.values()]:
        assert path.startswith(steps.CLUSTER_DATA_ROOT + "/"), path
    # Distinct directories: the shards, the features and the checkpoints never land in a panel.
    assert len({steps.CLUSTER_PANEL_ROOT, *SHARED.values()}) == 4
    # params.yaml's own defaults are relative paths (local runs): without the overrides each pod
    # would write its own copy.
    local = effective([])
    assert all(not str(local[key]).startswith("/") for key in SHARED), local


def test_cluster_overrides_put_files_on_the_shared_volume_and_explicit_overrides_win():
    assert steps.cluster_overrides([], None) == list(steps.CLUSTER_SHARED_OVERRIDES)
    assert effective(steps.cluster_overrides()) == SHARED
    mine = ["train.cache_dir=/app/data/cache-big", "train.epochs=3"]
    merged = steps.cluster_overrides(mine, ["train.loss=siglip"])
    assert merged == ["preprocess.out_dir=/app/data/shards", "train.storage_path=/app/data/ray", *mine,
                      "train.loss=siglip"]
    assert effective(merged) == {**SHARED, "train.cache_dir": "/app/data/cache-big"}
    # A step override of the same key wins too (it comes last).
    merged = steps.cluster_overrides(mine, ["train.cache_dir=/app/data/cache-step"])
    assert effective(merged)["train.cache_dir"] == "/app/data/cache-step"


@pytest.mark.parametrize("user", [[], ["train.storage_path=/app/data/ray-team", " train.cache_dir = /app/data/c2"]])
def test_cluster_train_entrypoint_carries_the_shared_volume_overrides(mlflow_store, user):
    parser = build_parser()
    kube = FakeKube([("Complete", "SUCCEEDED")], logs={"ray-job-submitter": RUN_ID})

    def job_runs(body):
        kube.logs["ray-job-submitter"] = _mlflow_run(parser.parse_args(cli_commands(body["spec"]["entrypoint"])[-1])
                                                     .run_name)

    kube.on_create = job_runs
    cluster = cluster_settings(kube)
    cluster.overrides = list(user)
    grid = steps.grid_overrides("efficientnet_lite0", "mlp", "clip", "frozen")
    steps.pretrain("data/panels/tiny", grid, mode="cluster", dvc_hash="abc123.dir", cluster=cluster)
    fetch, train = cli_commands(kube.created[0]["spec"]["entrypoint"])
    assert fetch[fetch.index("--out") + 1].startswith("/app/data/panels/"), "the panel lands on the volume"
    args = parser.parse_args(train)
    expected = dict(SHARED)
    for item in user:
        key, value = item.split("=", 1)
        expected[key.strip()] = value.strip()
    got = effective(args.overrides)
    assert got == expected, "defaults on the shared volume; pipeline.cluster_overrides wins"
    assert args.overrides[-len(grid):] == grid, "the run's own overrides come last"


def test_cluster_tune_and_evaluate_entrypoints_carry_the_shared_volume_overrides(mlflow_store):
    parser = build_parser()
    kube = FakeKube([("Complete", "SUCCEEDED")] * 2,
                    logs={"ray-job-submitter": f"{steps.BEST_PARAMS_BEGIN}\ntemperature: 0.05\n{steps.BEST_PARAMS_END}"})
    cluster = cluster_settings(kube)
    cluster.overrides = []
    best = steps.tune("data/panels/tiny", study="s1", trials=2, mode="cluster", dvc_hash="abc123.dir",
                      cluster=cluster)
    assert best == ["train.temperature=0.05"]
    steps.evaluate(_mlflow_run(), mode="cluster", panel="data/panels/tiny", dvc_hash="abc123.dir",
                   overrides=["evaluate.checkpoints=[best]"], cluster=cluster)
    tune_cmd = cli_commands(kube.created[0]["spec"]["entrypoint"])[1]
    evaluate_cmd = cli_commands(kube.created[1]["spec"]["entrypoint"])[1]
    for command in (tune_cmd, evaluate_cmd):
        args = parser.parse_args(command)
        assert effective(args.overrides) == SHARED, command
    assert parser.parse_args(evaluate_cmd).overrides[-1] == "evaluate.checkpoints=[best]"


def test_local_mode_is_unchanged(mlflow_store, monkeypatch):
    calls = []
    monkeypatch.setattr(steps, "_cli", lambda args: calls.append(list(args)))
    run_id = _mlflow_run()
    steps.evaluate(run_id, mode="local", overrides=["evaluate.checkpoints=[best]"])
    assert calls == [["evaluate", "--run", run_id, "--set", "evaluate.checkpoints=[best]"]]
    assert not any("/app/data" in arg for call in calls for arg in call)
