# syntax=docker/dockerfile:1
#
# HESCAPE Ray image, CPU: the head, workers and job submitter of the KubeRay RayJob that runs
# `hescape train` / `hescape tune` in the pipeline's cluster mode (k8s/rayjob/rayjob-template.yaml).
#
# The base is the official Ray image whose Ray version equals the `ray==` pin in
# requirements/constraints.txt (2.60.0) on Python 3.11, the project's Python. On top of it, the
# hescape wheel is installed with the same constraints file as `make setup`, so Ray, torch, MLflow
# and every other package have exactly the versions the tests ran with.
#
# Build from the repository root:
#   docker build -f docker/ray-cpu.Dockerfile -t hescape/ray-cpu:dev .
#
# Pinned by tag; to pin by digest write `rayproject/ray:2.60.0-py311-cpu@sha256:<digest>` (see
# docker/README.md). No credentials are baked in; k8s/ passes them at run time by Secret name.

# ---------------------------------------------------------------------------------------------
# Stage 1: build the hescape wheel (pure Python); only the wheel reaches the final image.
FROM python:3.11-slim-bookworm AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
# Stage 2: the Ray runtime. rayproject/ray runs as user `ray` (uid 1000, gid 100) and keeps its
# Python environment under /home/ray/anaconda3, owned by that user: installing as that user needs
# no root at all.
FROM rayproject/ray:2.60.0-py311-cpu AS runtime
LABEL org.opencontainers.image.title="hescape-ray-cpu" \
      org.opencontainers.image.description="Ray 2.60.0 (CPU) with the HESCAPE library and pinned stack" \
      org.opencontainers.image.licenses="Apache-2.0"

# CPU workers: torch/torchvision from PyTorch's CPU wheel index (same versions as the pins, `+cpu`
# build). Set `--build-arg TORCH_INDEX_URL=` to take PyPI's default (CUDA) build instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

USER 1000:100
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The one constraints file of the project: the same pins as `make setup`.
COPY --chown=1000:100 requirements/constraints.txt /tmp/requirements/constraints.txt
COPY --chown=1000:100 --from=wheel /wheels /tmp/wheels
# `pip check` reports (without failing the build) conflicts with packages the Ray base image
# ships outside our pins (e.g. conda's own dependencies); `hescape` and its stack are pinned.
RUN pip install -c /tmp/requirements/constraints.txt \
         ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
         /tmp/wheels/hescape-*.whl \
    && python -c "import ray, torch, hescape; print('ray', ray.__version__, 'torch', torch.__version__)" \
    && (pip check || echo "WARNING: pip check reported conflicts with packages of the Ray base image") \
    && rm -rf /tmp/wheels

# Parameter and stage files travel with the image when they exist (the [l] globs let the build work
# before params.yaml / dvc.yaml are added; pyproject.toml guarantees one source). The RayJob
# entrypoint reads /app/params.yaml.
USER root
RUN mkdir -p /app && chown 1000:100 /app
COPY --chown=1000:100 pyproject.toml params.yam[l] dvc.yam[l] /app/

ENV PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    RAY_USAGE_STATS_ENABLED=0 \
    DO_NOT_TRACK=1
WORKDIR /app
# Back to the image's numeric non-root user for everything that runs in the cluster.
USER 1000:100
# No ENTRYPOINT/CMD: KubeRay sets the command of head and worker containers (`ray start ...`) and
# of the submitter (`ray job submit ... -- hescape train ...`).
