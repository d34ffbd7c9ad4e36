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


@pytest.fixture(scope="session")
def tiny_panel_dir(tmp_path_factory) -> Path:
    """A small simulated curated panel (600 spots, 6 samples, 4 donors, 40 genes, 32 px), built once."""
    from hescape.data.simulate import SimulationConfig, simulate_to_dir

    out = tmp_path_factory.mktemp("panels") / "tiny"
    simulate_to_dir(SimulationConfig(name="tiny", n_spots=600, n_samples=6, n_donors=4, n_genes=40, patch_px=32,
                                     seed=7), out)
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a fresh directory with its own MLflow SQLite store and artifact folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HESCAPE_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    return tmp_path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the tests that need it (2 CPUs, no dashboard), shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
