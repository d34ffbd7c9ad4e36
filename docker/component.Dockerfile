# syntax=docker/dockerfile:1
#
# HESCAPE component image: the `hescape` CLI and library with the pinned stack, used by
#   - the KFP v2 components (every pipeline step is a `hescape` subcommand),
#   - the MLflow tracking server in k8s/ (the same pinned mlflow, psycopg2 and boto3),
#   - small cluster jobs (creating the S3 buckets).
#
# Build from the repository root (the build context must be the root: it needs
# requirements/constraints.txt, pyproject.toml and src/):
#   docker build -f docker/component.Dockerfile -t hescape/component:dev .
#
# Base images are pinned by tag. To pin by digest as well, resolve the digest once and write it
# after the tag, e.g. `FROM python:3.11-slim-bookworm@sha256:<digest>`; see docker/README.md.
#
# No credentials are baked in: S3 keys and database passwords reach the containers at run time
# from Kubernetes Secrets referenced by name (k8s/).

# ---------------------------------------------------------------------------------------------
# Stage 1: build the hescape wheel (pure Python) so that no source tree lands in the final image.
FROM python:3.11-slim-bookworm AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
# Stage 2: install the wheel and the whole pinned stack into a virtual environment. Compilers live
# only in this stage (in case a pinned package ships no wheel for this platform).
FROM python:3.11-slim-bookworm AS build
# The component image runs CPU work (preprocess, evaluation, reports, MLflow): by default torch and
# torchvision come from PyTorch's CPU wheel index (same versions as the pins, `+cpu` local build,
# no 3 GB of CUDA libraries). Build with `--build-arg TORCH_INDEX_URL=` for PyPI's default CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The one constraints file of the project: the same pins as `make setup`.
COPY requirements/constraints.txt /tmp/requirements/constraints.txt
COPY --from=wheel /wheels /wheels
RUN pip install --upgrade "pip>=24" \
    && pip install -c /tmp/requirements/constraints.txt \
         ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
         /wheels/hescape-*.whl \
    && pip check

# ---------------------------------------------------------------------------------------------
# Stage 3: runtime. Only the virtual environment and the project's parameter files are copied in.
FROM python:3.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="hescape-component" \
      org.opencontainers.image.description="HESCAPE CLI and library for KFP components and MLflow" \
      org.opencontainers.image.licenses="Apache-2.0"

# Numeric non-root user 10001 (Kubernetes runAsNonRoot can only verify numeric users; k8s/ runs
# the pods with runAsUser 10001 to match).
RUN groupadd --gid 10001 hescape \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/hescape \
         --shell /usr/sbin/nologin hescape \
    # The KFP v2 launcher stages artifacts under /gcs, /minio and /s3: create them for the user so
    # that components also run as non-root (kubeflow/pipelines#10397).
    && mkdir -p /gcs /minio /s3 /app \
    && chown 10001:10001 /gcs /minio /s3 /app

COPY --from=build /opt/venv /opt/venv
# Parameter and stage files travel with the image when they exist (the [l] globs let the build work
# before params.yaml / dvc.yaml are added to the repository; pyproject.toml guarantees one source).
COPY --chown=10001:10001 pyproject.toml params.yam[l] dvc.yam[l] /app/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/hescape \
    MLFLOW_DISABLE_TELEMETRY=true \
    RAY_USAGE_STATS_ENABLED=0 \
    DO_NOT_TRACK=1

WORKDIR /app
USER 10001:10001
# `hescape --help` lists the pipeline steps; KFP and k8s/ override the command per task.
ENTRYPOINT ["hescape"]
CMD ["--help"]
