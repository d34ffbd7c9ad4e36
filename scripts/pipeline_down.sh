#!/usr/bin/env bash
# `make pipeline-down`: undo `make pipeline`. Stops the port-forwards that scripts/pipeline_up.sh
# started (by their recorded pids only) and deletes the kind cluster with everything in it
# (Kubeflow Pipelines, KubeRay, MLflow, PostgreSQL and SeaweedFS data, the generated Secrets).
# Built images stay in the local Docker image store (`docker image rm hescape/component:dev ...`).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

CLUSTER_NAME="hescape"                # must match `name:` in k8s/kind-cluster.yaml
STATE_DIR="$REPO/.scratch/pipeline"   # written by scripts/pipeline_up.sh

die() { echo "pipeline_down: error: $*" >&2; exit 1; }

# Port-forwards: only the processes whose pids pipeline_up.sh recorded, and only while they still
# are kubectl port-forwards (a pid may have been reused since).
for pidfile in "$STATE_DIR"/port-forward-*.pid; do
  [[ -e "$pidfile" ]] || continue
  pid="$(cat "$pidfile")"
  if [[ -n "$pid" ]] && ps -p "$pid" -o args= 2>/dev/null | grep -q "port-forward"; then
    kill "$pid" 2>/dev/null || true
    echo "stopped port-forward (pid $pid)"
  fi
  rm -f "$pidfile"
done

command -v kind >/dev/null 2>&1 \
  || die "'kind' not found on PATH: cannot delete cluster '$CLUSTER_NAME' (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  kind delete cluster --name "$CLUSTER_NAME"
else
  echo "no kind cluster named '$CLUSTER_NAME': nothing to delete"
fi
rm -rf "$STATE_DIR"
