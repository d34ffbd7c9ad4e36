"""KubeRay RayJobs for the pipeline's cluster mode: build, create, watch, surface logs, delete.

The cluster-mode steps of the pipeline run the same ``hescape`` CLI as local runs, inside a Ray
cluster that KubeRay creates for one RayJob:

1. :func:`load_template` reads the suspended RayJob ``hescape-train-template`` from the cluster
   (``kubectl -n hescape get rayjob hescape-train-template``, so the overlay's patches apply: image,
   sizes, GPUs) or from a YAML file (``k8s/rayjob/rayjob-template.yaml``) when no cluster is involved;
2. :func:`build_rayjob` copies its ``spec`` under a fresh name with ``suspend: false``, the step's own
   ``entrypoint``, image, worker replicas and GPUs, tolerations, ``shutdownAfterJobFinishes``,
   ``ttlSecondsAfterFinished`` and ``activeDeadlineSeconds``, and labels it with the pipeline run;
3. :func:`run_rayjob` creates it, polls ``status.jobDeploymentStatus`` / ``status.jobStatus`` until a
   terminal state or its own deadline, reads the submitter's (and on failure the head's) pod logs,
   and deletes the RayJob in ``finally`` whatever happened;
4. :func:`delete_rayjobs` deletes every RayJob with a label, the pipeline's exit handler.

The Kubernetes API is reached through ``kubernetes.client.CustomObjectsApi`` / ``CoreV1Api``;
every function takes them as arguments (default: :func:`kube_clients`), so tests pass fakes.
"""

from __future__ import annotations

import copy
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hescape.errors import ConfigError, HescapeError

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayjobs", "RayJob"
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_NAMESPACE = "hescape"
TEMPLATE_NAME = "hescape-train-template"
TEMPLATE_FILE = "k8s/rayjob/rayjob-template.yaml"

LABEL_PIPELINE_RUN = "hescape.io/pipeline-run"
LABEL_STEP = "hescape.io/step"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "hescape-pipeline"
TEMPLATE_LABEL = "hescape.io/template"

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}

# KubeRay names the RayCluster `<rayjob>-<5 chars>` and its services after that: keep RayJob names
# well inside the 63 characters of a DNS label.
MAX_NAME_LENGTH = 47

# status.jobDeploymentStatus values after which KubeRay does nothing more with the RayJob.
TERMINAL_DEPLOYMENT_STATUSES = frozenset({"Complete", "Failed", "ValidationFailed"})
SUCCEEDED = "SUCCEEDED"


class RayJobError(HescapeError):
    """A RayJob did not succeed; carries its name, last status and the pod logs that were read."""

    def __init__(self, message: str, *, name: str, status: Mapping | None = None, logs: str = ""):
        self.name = name
        self.status = dict(status or {})
        self.logs = logs
        detail = f"\n--- pod logs (tail) ---\n{logs.rstrip()}" if logs.strip() else ""
        super().__init__(f"{message}{detail}")


class RayJobFailed(RayJobError):
    """KubeRay reported the RayJob failed (the job failed, its submission failed, its deadline passed)."""


class RayJobTimeout(RayJobError):
    """The RayJob did not reach a terminal state before the step's deadline."""


@dataclass
class RayJobOptions:
    """What a pipeline step changes in the template's copy.

    Attributes
    ----------
    image
        Image of every Ray container (head, workers, submitter); ``None`` keeps the template's.
    worker_replicas
        Pods per worker group (``replicas`` = ``minReplicas`` = ``maxReplicas``); ``None`` keeps them.
    gpus_per_worker
        ``nvidia.com/gpu`` requested and limited per worker pod; ``0`` removes a GPU request, ``None``
        keeps the template's. With GPUs the workers tolerate the GPU nodes' ``NoSchedule`` taint.
    tolerations
        Extra tolerations of the worker pods.
    node_selector
        Extra node selector of the worker pods.
    shutdown_after_job_finishes, ttl_seconds_after_finished
        Delete the Ray cluster this many seconds after the job ends (the RayJob object stays until
        the step deletes it, so that its final status can be read).
    active_deadline_seconds
        KubeRay fails the RayJob after this many seconds.
    labels
        Labels of the RayJob and its pods (e.g. the pipeline run, the step).
    """

    image: str | None = None
    worker_replicas: int | None = None
    gpus_per_worker: int | None = None
    tolerations: list[dict] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    shutdown_after_job_finishes: bool = True
    ttl_seconds_after_finished: int = 300
    active_deadline_seconds: int = 86400
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class RayJobResult:
    """A RayJob that succeeded: its name, final status and the submitter's log (the job's output)."""

    name: str
    status: dict
    logs: str


# ------------------------------------------------------------------------------------------------
# Names and labels
# ------------------------------------------------------------------------------------------------

def label_value(text: str) -> str:
    """``text`` as a valid Kubernetes label value (<= 63 characters of ``[A-Za-z0-9._-]``,
    alphanumeric at both ends; empty stays empty)."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text))[:63]
    return value.strip("-._")


def rayjob_name(step: str, token: str | None = None) -> str:
    """A fresh DNS-1123 RayJob name, ``hescape-<step>-<token>``, at most :data:`MAX_NAME_LENGTH` chars.

    ``token`` defaults to a random hex string; a given token is shortened, never the random suffix.
    """
    suffix = uuid.uuid4().hex[:8]
    stem = re.sub(r"[^a-z0-9-]+", "-", f"hescape-{step}-{token or ''}".lower()).strip("-")
    stem = re.sub(r"-+", "-", stem)[: MAX_NAME_LENGTH - len(suffix) - 1].rstrip("-")
    return f"{stem}-{suffix}"


# ------------------------------------------------------------------------------------------------
# Kubernetes clients and the template
# ------------------------------------------------------------------------------------------------

def kube_clients():
    """``(CustomObjectsApi, CoreV1Api)`` from the in-cluster service account, else ``~/.kube/config``."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise ConfigError("cluster mode needs the Kubernetes API: no in-cluster service account and no "
                              f"usable kubeconfig ({exc})") from exc
    return client.CustomObjectsApi(), client.CoreV1Api()


def is_template_file(template: str) -> bool:
    """Whether ``template`` names a YAML file rather than a RayJob in the cluster."""
    return str(template).endswith((".yaml", ".yml")) or Path(template).is_file()


def load_template(template: str = TEMPLATE_NAME, *, namespace: str = DEFAULT_NAMESPACE, custom_api=None) -> dict:
    """The RayJob template: a YAML file when ``template`` names one, else the RayJob of that name in
    ``namespace`` (the cluster's copy carries the overlay's patches)."""
    if is_template_file(template):
        path = Path(template)
        if not path.is_file():
            raise ConfigError(f"RayJob template file {path} does not exist")
        doc = yaml.safe_load(path.read_text())
        source = str(path)
    else:
        if custom_api is None:
            custom_api, _ = kube_clients()
        try:
            doc = custom_api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, template)
        except api_errors() as exc:
            raise ConfigError(f"cannot read RayJob {namespace}/{template} (the suspended template applied by "
                              f"k8s/rayjob; `kubectl -n {namespace} get rayjob {template}`): {exc}") from exc
        source = f"rayjob {namespace}/{template}"
    if not isinstance(doc, dict) or doc.get("kind") != KIND or not isinstance(doc.get("spec"), dict):
        raise ConfigError(f"{source} is not a RayJob")
    return doc


# ------------------------------------------------------------------------------------------------
# Building the RayJob
# ------------------------------------------------------------------------------------------------

def _ray_pod_templates(spec: dict) -> list[tuple[str, dict]]:
    """``(role, pod template)`` of the head, every worker group and the submitter."""
    cluster = spec.get("rayClusterSpec") or {}
    found = []
    if "headGroupSpec" in cluster:
        found.append(("head", cluster["headGroupSpec"]["template"]))
    for group in cluster.get("workerGroupSpecs") or []:
        found.append(("worker", group["template"]))
    if "submitterPodTemplate" in spec:
        found.append(("submitter", spec["submitterPodTemplate"]))
    return found


def build_rayjob(template: Mapping, *, name: str, entrypoint: str, namespace: str = DEFAULT_NAMESPACE,
                 options: RayJobOptions | None = None) -> dict:
    """A runnable copy of the template: fresh metadata, the template's ``spec`` with ``suspend: false``,
    ``entrypoint`` and the :class:`RayJobOptions` applied. The template itself is not changed."""
    options = options or RayJobOptions()
    if not entrypoint.strip():
        raise ConfigError("a RayJob needs an entrypoint")
    if len(name) > MAX_NAME_LENGTH or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        raise ConfigError(f"RayJob name {name!r}: need a DNS-1123 label of at most {MAX_NAME_LENGTH} characters")
    spec = copy.deepcopy(dict(template["spec"]))
    labels = {k: v for k, v in ((template.get("metadata") or {}).get("labels") or {}).items() if k != TEMPLATE_LABEL}
    labels[LABEL_MANAGED_BY] = MANAGED_BY
    labels.update({k: label_value(v) for k, v in options.labels.items()})

    spec["suspend"] = False
    spec["entrypoint"] = entrypoint
    spec["shutdownAfterJobFinishes"] = bool(options.shutdown_after_job_finishes)
    spec["ttlSecondsAfterFinished"] = int(options.ttl_seconds_after_finished)
    spec["activeDeadlineSeconds"] = int(options.active_deadline_seconds)

    for role, pod in _ray_pod_templates(spec):
        meta = pod.setdefault("metadata", {})
        meta["labels"] = {**(meta.get("labels") or {}), **{k: label_value(v) for k, v in options.labels.items()}}
        pod_spec = pod["spec"]
        ray_container = pod_spec["containers"][0]
        if options.image:
            ray_container["image"] = options.image
        if role != "worker":
            continue
        if options.gpus_per_worker is not None:
            resources = ray_container.setdefault("resources", {})
            for section in ("requests", "limits"):
                values = resources.setdefault(section, {})
                if options.gpus_per_worker > 0:
                    values[GPU_RESOURCE] = str(int(options.gpus_per_worker))
                else:
                    values.pop(GPU_RESOURCE, None)
        tolerations = list(pod_spec.get("tolerations") or [])
        wanted = list(options.tolerations)
        if options.gpus_per_worker:
            wanted.append(GPU_TOLERATION)
        for toleration in wanted:
            if toleration not in tolerations:
                tolerations.append(dict(toleration))
        if tolerations:
            pod_spec["tolerations"] = tolerations
        if options.node_selector:
            pod_spec["nodeSelector"] = {**(pod_spec.get("nodeSelector") or {}), **options.node_selector}

    if options.worker_replicas is not None:
        for group in spec.get("rayClusterSpec", {}).get("workerGroupSpecs") or []:
            group["replicas"] = group["minReplicas"] = group["maxReplicas"] = int(options.worker_replicas)

    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": spec}


# ------------------------------------------------------------------------------------------------
# Running it
# ------------------------------------------------------------------------------------------------

def _api_status(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


def api_errors() -> tuple[type[BaseException], ...]:
    """What a call to the Kubernetes API raises when the API (not our code) fails."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    return ApiException, urllib3.exceptions.HTTPError, OSError


def job_logs(name: str, status: Mapping | None, *, namespace: str, core_api, tail_lines: int = 200,
             head: bool = True) -> str:
    """The tail of the submitter pod's log (the job's output) and, with ``head``, of the head pod's.

    Errors reading a log are reported in the text, never raised: logs are a diagnosis aid.
    """
    selectors = [("submitter", f"job-name={name}")]
    cluster = (status or {}).get("rayClusterName")
    if head and cluster:
        selectors.append(("head", f"ray.io/cluster={cluster},ray.io/node-type=head"))
    parts = []
    for role, selector in selectors:
        try:
            pods = core_api.list_namespaced_pod(namespace, label_selector=selector).items or []
        except api_errors() as exc:
            parts.append(f"=== {role} pods ({selector}): cannot list: {exc}")
            continue
        if not pods:
            parts.append(f"=== {role}: no pod ({selector})")
        for pod in pods:
            pod_name = pod.metadata.name
            container = pod.spec.containers[0].name if pod.spec and pod.spec.containers else None
            try:
                text = core_api.read_namespaced_pod_log(pod_name, namespace, container=container,
                                                        tail_lines=tail_lines)
            except api_errors() as exc:
                text = f"(cannot read the log: {exc})"
            parts.append(f"=== {role} pod {pod_name}:\n{(text or '').rstrip()}")
    return "\n".join(parts)


def delete_rayjob(name: str, *, namespace: str, custom_api) -> bool:
    """Delete one RayJob (foreground: its Ray cluster and submitter go with it). ``False`` if it was
    already gone."""
    try:
        custom_api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                   body={"propagationPolicy": "Foreground"})
    except api_errors() as exc:
        if _api_status(exc) == 404:
            return False
        raise
    log.info("deleted RayJob %s/%s", namespace, name)
    return True


def delete_rayjobs(label_selector: str, *, namespace: str = DEFAULT_NAMESPACE, custom_api=None) -> list[str]:
    """Delete every RayJob matching ``label_selector`` (the pipeline's exit handler); returns the names."""
    if custom_api is None:
        custom_api, _ = kube_clients()
    listed = custom_api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, label_selector=label_selector)
    deleted = []
    for item in listed.get("items") or []:
        name = item["metadata"]["name"]
        if delete_rayjob(name, namespace=namespace, custom_api=custom_api):
            deleted.append(name)
    return deleted


def run_rayjob(job: Mapping, *, timeout_s: float, poll_s: float = 10.0, custom_api=None, core_api=None,
               tail_lines: int = 200, max_api_errors: int = 5, sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.monotonic) -> RayJobResult:
    """Create ``job``, wait until KubeRay reports a terminal state or ``timeout_s`` passes, and delete it.

    Parameters
    ----------
    job
        A RayJob object from :func:`build_rayjob` (``metadata.namespace`` names the namespace).
    timeout_s
        The step's own deadline in seconds (KubeRay's ``activeDeadlineSeconds`` is the cluster's).
    poll_s
        Seconds between two reads of the RayJob's status.
    custom_api, core_api
        ``kubernetes.client.CustomObjectsApi`` / ``CoreV1Api`` (default: :func:`kube_clients`).
    tail_lines
        Lines of each pod log to keep.
    max_api_errors
        Consecutive failed status reads (API server hiccups) tolerated before giving up.

    Returns
    -------
    RayJobResult
        Name, final status and the submitter's log, which holds the job's output.

    Raises
    ------
    RayJobFailed
        KubeRay reports the job failed (message, reason and the submitter/head pod logs attached).
    RayJobTimeout
        No terminal state within ``timeout_s`` (pod logs attached).

    The RayJob is deleted in every case once it was created (a failed delete is logged, never
    allowed to hide the step's own error).
    """
    if custom_api is None or core_api is None:
        default_custom, default_core = kube_clients()
        custom_api, core_api = custom_api or default_custom, core_api or default_core
    name = job["metadata"]["name"]
    namespace = job["metadata"].get("namespace") or DEFAULT_NAMESPACE
    custom_api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dict(job))
    log.info("created RayJob %s/%s: %s", namespace, name, job["spec"].get("entrypoint"))
    try:
        deadline = clock() + timeout_s
        status: dict = {}
        seen = None
        errors = 0
        while True:
            try:
                obj = custom_api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
                errors = 0
            except api_errors() as exc:
                if _api_status(exc) == 404:
                    raise RayJobFailed(f"RayJob {namespace}/{name} disappeared while running", name=name,
                                       status=status) from exc
                errors += 1
                if errors >= max_api_errors:
                    raise
                log.warning("reading RayJob %s/%s failed (%s); retrying", namespace, name, exc)
                obj = None
            if obj is not None:
                status = dict(obj.get("status") or {})
                deployment, job_status = status.get("jobDeploymentStatus"), status.get("jobStatus")
                if (deployment, job_status) != seen:
                    seen = (deployment, job_status)
                    log.info("RayJob %s: deployment %s, job %s", name, deployment or "-", job_status or "-")
                if deployment in TERMINAL_DEPLOYMENT_STATUSES:
                    succeeded = deployment == "Complete" and job_status == SUCCEEDED
                    logs = job_logs(name, status, namespace=namespace, core_api=core_api,
                                    tail_lines=tail_lines, head=not succeeded)
                    if succeeded:
                        return RayJobResult(name=name, status=status, logs=logs)
                    reason = ": ".join(filter(None, (status.get("reason"), status.get("message")))) or "no reason given"
                    raise RayJobFailed(f"RayJob {namespace}/{name} {deployment} (job {job_status or '-'}): {reason}",
                                       name=name, status=status, logs=logs)
            if clock() >= deadline:
                logs = job_logs(name, status, namespace=namespace, core_api=core_api, tail_lines=tail_lines)
                raise RayJobTimeout(f"RayJob {namespace}/{name} not finished after {timeout_s:g} s (deployment "
                                    f"{status.get('jobDeploymentStatus') or '-'}, job {status.get('jobStatus') or '-'})",
                                    name=name, status=status, logs=logs)
            sleep(poll_s)
    finally:
        try:
            delete_rayjob(name, namespace=namespace, custom_api=custom_api)
        except api_errors() as exc:  # never hide the step's own outcome
            log.error("could not delete RayJob %s/%s: %s (the pipeline's exit handler retries)", namespace, name, exc)
