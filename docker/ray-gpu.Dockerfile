# syntax=docker/dockerfile:1
#
# HESCAPE Ray image, GPU (CUDA): the head, GPU workers and job submitter of the KubeRay RayJob in
# the `gpu` overlay (k8s/overlays/gpu), for distributed multi-GPU contrastive pretraining.
#
# The base is the official CUDA Ray image whose Ray version equals the `ray==` pin in
# requirements/constraints.txt (2.60.0) on Python 3.11. On top of it, the hescape wheel is
# installed with the same constraints file as `make setup`; torch 2.14.1 and torchvision 0.29.1
# come from PyPI's default (CUDA) build, whose CUDA runtime libraries are the pinned nvidia-*-cu13
# wheels of the constraints file. Torch therefore brings its own CUDA 13.0 user-space libraries and
# needs only the node's NVIDIA driver (R580 or newer for CUDA 13); the CUDA 12.8 toolkit of the
# base image is not used by torch (different sonames, no clash).
#
# Build from the repository root:
#   docker build -f docker/ray-gpu.Dockerfile -t hescape/ray-gpu:dev .
#
# Pinned by tag; to pin by digest write `rayproject/ray:2.60.0-py311-cu128@sha256:<digest>` (see
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
# Python environment under /home/ray/anaconda3, owned by that user: installing needs no root.
FROM rayproject/ray:2.60.0-py311-cu128 AS runtime
LABEL org.opencontainers.image.title="hescape-ray-gpu" \
      org.opencontainers.image.description="Ray 2.60.0 (CUDA) with the HESCAPE library and pinned stack" \
      org.opencontainers.image.licenses="Apache-2.0"

USER 1000:100
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The one constraints file of the project: the same pins as `make setup` (torch==2.14.1 resolves to
# PyPI's default CUDA build here: no extra index).
COPY --chown=1000:100 requirements/constraints.txt /tmp/requirements/constraints.txt
COPY --chown=1000:100 --from=wheel /wheels /tmp/wheels
# `pip check` reports (without failing the build) conflicts with packages the Ray base image
# ships outside our pins (e.g. conda's own dependencies); `hescape` and its stack are pinned.
RUN pip install -c /tmp/requirements/constraints.txt /tmp/wheels/hescape-*.whl \
    && python -c "import ray, torch, hescape; print('ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
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
