"""Shared fixtures. Data come from the project's own simulator or are built by the test itself;
the real panel gene lists and split tables are read from ../shared/reference when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"

for _key, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/reference`` (real panel gene lists, split tables, KubeRay CRDs); skips if absent."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE} (kept outside the repository)")
    return REFERENCE
