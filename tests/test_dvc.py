"""Data versioning with real DVC: the repository's pipeline files, the default local remote with nothing
configured, and an S3 remote on moto's S3 API server (127.0.0.1): repro, push, delete the output and
the cache, pull, and check every file against the SHA-256 in ``panel.json``."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from s3_server import s3_server  # noqa: F401  (pytest fixture)

from hescape import versioning
from hescape.cli import main
from hescape.config import load_params
from hescape.data import keys
from hescape.data.panel import validate_panel
from hescape.errors import ConfigError
from hescape.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
OUT = "data/panels/tiny"
N_SAMPLES, N_PER_SAMPLE, N_GENES, PX = 4, 6, 12, 8

# The stage command of the temporary repositories: a tiny curated panel from its params block,
# written with the platform's own writer (atomic, hashes in panel.json).
MAKE_PANEL = textwrap.dedent(f'''
    import numpy as np
    import pandas as pd

    from hescape.config import load_params
    from hescape.data import keys
    from hescape.data.panel import Panel, PanelMeta, encode_png, write_panel

    p = load_params("params.yaml")["tiny"]
    rng = np.random.default_rng(p["seed"])
    ids = [f"s{{i}}" for i in range(p["n_samples"])]
    n = p["n_per_sample"] * len(ids)
    obs = pd.DataFrame({{
        keys.SAMPLE: np.repeat(ids, p["n_per_sample"]),
        keys.DONOR: np.repeat([f"d{{i}}" for i in range(len(ids))], p["n_per_sample"]),
        keys.TISSUE: "tissue0",
        keys.SOURCE: "dvc-test",
        keys.X: np.arange(n, dtype=float),
        keys.Y: np.zeros(n),
    }})
    meta = PanelMeta(name="tiny", genes=[f"G{{i}}" for i in range(p["n_genes"])], patch_size_px=p["px"],
                     splits={{"train": ids[:-2], "val": [ids[-2]], "test": [ids[-1]]}})
    images = [encode_png(rng.integers(0, 255, (p["px"], p["px"], 3), dtype=np.uint8)) for _ in range(n)]
    counts = rng.poisson(3, (n, p["n_genes"])).astype(np.int32)
    write_panel(Panel(meta=meta, obs=obs, counts=counts, images=images), "{OUT}", overwrite=True)
''')


@pytest.fixture
def hermetic_env(tmp_path, monkeypatch):
    """Keep DVC's user/system config and site cache, and the AWS files, out of the tests."""
    for var, sub in (("DVC_GLOBAL_CONFIG_DIR", "dvc-global"), ("DVC_SYSTEM_CONFIG_DIR", "dvc-system"),
                     ("DVC_SITE_CACHE_DIR", "dvc-site-cache")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    for var in ("HESCAPE_S3_BUCKET", "HESCAPE_S3_PREFIX", "HESCAPE_S3_ENDPOINT", "HESCAPE_S3_REGION",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "HESCAPE_PARAMS"):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):  # empty, so ~/.aws cannot leak in
        (tmp_path / var.lower()).touch()
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))


def init_repo(repo: Path) -> Path:
    """``git init`` + ``dvc init`` with the project's ``.dvc/config``, ``.dvcignore`` and ``.gitignore``."""
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    versioning.run_dvc(["init", "-q"], repo=repo)
    for name in (".dvc/config", ".dvcignore", ".gitignore"):
        shutil.copyfile(REPO / name, repo / name)
    return repo


@pytest.fixture
def dvc_repo(tmp_path, hermetic_env) -> Path:
    """A fresh git + DVC repository with the project's own ``.dvc/config``, ``.dvcignore`` and
    ``.gitignore``, and one stage that writes a tiny curated panel."""
    repo = init_repo(tmp_path / "repo")
    (repo / "make_panel.py").write_text(MAKE_PANEL)
    (repo / "params.yaml").write_text(yaml.safe_dump({"tiny": {
        "seed": 0, "n_samples": N_SAMPLES, "n_per_sample": N_PER_SAMPLE, "n_genes": N_GENES, "px": PX}}))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"tiny": {
        "cmd": "python make_panel.py", "deps": ["make_panel.py"], "params": ["tiny"], "outs": [OUT]}}},
        sort_keys=False))
    return repo


def file_hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def check_panel(out: Path, expected: dict[str, str]) -> None:
    """Every file listed in panel.json matches its SHA-256; the directory is byte-identical to
    ``expected``; the panel validates."""
    meta = json.loads((out / keys.PANEL_JSON).read_text())
    assert len(meta["files"]) == N_SAMPLES
    for entry in meta["files"]:
        assert sha256_file(out / entry["path"]) == entry["sha256"], entry["path"]
    assert file_hashes(out) == expected
    panel, report = validate_panel(out)
    assert len(panel) == N_SAMPLES * N_PER_SAMPLE and report.ok


def drop_output_and_cache(repo: Path) -> None:
    shutil.rmtree(repo / OUT)
    shutil.rmtree(repo / ".dvc" / "cache")
    assert not (repo / OUT).exists()


#  The repository's own files


def test_repository_pipeline_files(hermetic_env):
    params = load_params(REPO / "params.yaml")
    sim = params["simulate"]
    for key in ("seed", "name", "n_spots", "n_samples", "n_donors", "n_tissues", "n_cell_types", "n_genes",
                "genes_file", "patch_px", "patch_um", "test_donors", "val_donors"):
        assert key in sim, key
    assert params["import_hest"] == {"patch_um": 112, "patch_px": 224}

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["simulate"]
    assert stage["cmd"].split()[:2] == ["hescape", "simulate"]
    assert "simulate" in stage["params"] and stage["outs"] == ["data/panels/simulated"]
    out_arg = stage["cmd"].split("--out", 1)[1].split()[0]
    assert out_arg == "data/panels/simulated"
    missing = [d for d in stage["deps"] if not (REPO / d).exists()]
    assert not missing, f"dvc.yaml deps not in the repository: {missing}"

    listed = versioning.run_dvc(["stage", "list"], repo=REPO).stdout
    assert listed.split()[0] == "simulate" and "data/panels/simulated" in listed
    config = versioning.run_dvc(["config", "--list", "--project"], repo=REPO).stdout.splitlines()
    assert "core.remote=local" in config and "core.analytics=false" in config
    assert f"remote.local.url={REPO / '.dvcstore'}" in config
    assert "remote.s3.url=s3://dvc/hescape" in config
    assert not any("secret" in line or "access_key" in line for line in config)
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvcstore/files"], cwd=REPO, check=False)
    assert ignored.returncode == 0, ".dvcstore/ (the local remote) must be git-ignored"


def test_simulate_params_match_the_simulator():
    simulate = pytest.importorskip("hescape.data.simulate")
    from hescape.config import section

    cfg = section(load_params(REPO / "params.yaml"), "simulate", simulate.SimulationConfig)
    assert cfg.n_genes == load_params(REPO / "params.yaml")["simulate"]["n_genes"]


@pytest.mark.slow
def test_repository_simulate_stage(tmp_path, hermetic_env):
    """The repository's own `simulate` stage (dvc.yaml, params.yaml, deps) with tiny sizes: what
    `make data` runs, then a parameter change makes the stage stale."""
    pytest.importorskip("hescape.commands.simulate")
    repo = init_repo(tmp_path / "repo")
    shutil.copyfile(REPO / "dvc.yaml", repo / "dvc.yaml")
    for dep in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["simulate"]["deps"]:
        (repo / dep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / dep, repo / dep)
    params = load_params(REPO / "params.yaml")
    params["simulate"].update(n_spots=60, n_samples=4, n_donors=3, n_tissues=1, n_cell_types=3, n_genes=16,
                              patch_px=16)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    versioning.run_dvc(["repro"], repo=repo)
    versioning.run_dvc(["push"], repo=repo)
    out = repo / "data" / "panels" / "simulated"
    panel, report = validate_panel(out)
    assert len(panel) == 60 and panel.meta.n_genes == 16 and report.ok
    assert versioning.dvc_revision(out, repo=repo).endswith(".dir")
    assert (repo / ".dvcstore" / "files" / "md5").is_dir()
    assert "up to date" in versioning.run_dvc(["status"], repo=repo).stdout

    params["simulate"]["seed"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = json.loads(versioning.run_dvc(["status", "--json"], repo=repo).stdout)
    assert stale == {"simulate": [{"changed deps": {"params.yaml": {"simulate": "modified"}}}]}, stale


#  Library helpers


def test_dvc_revision_and_git_commit(tmp_path, hermetic_env):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"s": {
        "cmd": "x", "outs": [{"path": "data/panels/p", "hash": "md5", "md5": "abc.dir", "nfiles": 2}]}}}))
    (tmp_path / "raw.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "def", "hash": "md5", "path": "raw"}]}))
    assert versioning.dvc_revision(tmp_path / "data/panels/p") == "abc.dir"
    assert versioning.dvc_revision("data/panels/p/", repo=tmp_path) == "abc.dir"
    assert versioning.dvc_revision(tmp_path / "raw") == "def"
    assert versioning.dvc_revision(tmp_path / "data/panels/other") is None
    assert versioning.dvc_revision(tmp_path.parent / "elsewhere") is None
    assert versioning.git_commit(tmp_path) is None and versioning.git_dirty(tmp_path) is None

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert versioning.git_commit(tmp_path) is None  # no commit yet
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
                    "-m", "x"], cwd=tmp_path, check=True)
    head = versioning.git_commit(tmp_path)
    assert head and len(head) == 40 and versioning.git_dirty(tmp_path) is False
    info = versioning.data_version(tmp_path / "data/panels/p")
    assert info["dvc_hash"] == "abc.dir" and info["git_commit"] == head


def test_run_dvc_failure_shows_stderr(tmp_path, hermetic_env):
    with pytest.raises(versioning.DvcError) as err:
        versioning.run_dvc(["status"], repo=tmp_path)
    assert err.value.returncode != 0 and "not inside of a DVC repository" in str(err.value)
    assert "`dvc status`" in str(err.value)


def test_s3_settings_from_env():
    env = {"HESCAPE_S3_BUCKET": "s3://bkt/", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
           "AWS_SECRET_ACCESS_KEY": "never-written"}
    assert versioning.s3_settings_from_env(env) == {"url": "s3://bkt/dvc", "endpointurl": "http://127.0.0.1:9000"}
    env["HESCAPE_S3_ENDPOINT"], env["HESCAPE_S3_PREFIX"] = "https://s3.example", "a/b/"
    assert versioning.s3_settings_from_env(env) == {"url": "s3://bkt/a/b", "endpointurl": "https://s3.example"}
    assert versioning.s3_settings_from_env({}) == {}
    with pytest.raises(ConfigError):
        versioning.s3_settings_from_env({"HESCAPE_S3_BUCKET": "bkt/path"})
    with pytest.raises(ConfigError):
        versioning.s3_settings_from_env({"HESCAPE_S3_ENDPOINT": "127.0.0.1:9000"})


#  Real DVC round trips


@pytest.mark.slow
def test_default_local_remote_needs_no_configuration(dvc_repo):
    versioning.run_dvc(["repro"], repo=dvc_repo)
    expected = file_hashes(dvc_repo / OUT)
    md5 = versioning.dvc_revision(dvc_repo / OUT)
    assert md5 and md5.endswith(".dir")

    pushed = versioning.run_dvc(["push"], repo=dvc_repo).stdout
    store = dvc_repo / ".dvcstore"
    assert f"{N_SAMPLES + 2} files pushed" in pushed  # parquet files + panel.json + the .dir listing
    assert sum(1 for p in store.rglob("*") if p.is_file()) == N_SAMPLES + 2

    drop_output_and_cache(dvc_repo)
    versioning.run_dvc(["pull"], repo=dvc_repo)
    check_panel(dvc_repo / OUT, expected)
    assert versioning.dvc_revision(dvc_repo / OUT) == md5


@pytest.mark.slow
def test_s3_remote_push_pull_round_trip(dvc_repo, s3_server, monkeypatch, capsys):  # noqa: F811
    server = s3_server.with_new_bucket()
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint must come from .dvc/config.local
    monkeypatch.setenv("HESCAPE_S3_PREFIX", "panels/dvc")

    # `hescape data s3-remote --default`: bucket/prefix/endpoint into config.local, never credentials.
    assert main(["data", "s3-remote", "--repo", str(dvc_repo), "--default"]) == 0
    printed = capsys.readouterr().out
    assert f"remote.s3.url = s3://{server.bucket}/panels/dvc" in printed
    local = (dvc_repo / ".dvc" / "config.local").read_text()
    assert server.endpoint in local and server.secret_access_key not in local
    assert server.access_key_id not in local
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=dvc_repo, check=False)
    assert ignored.returncode == 0

    versioning.run_dvc(["repro"], repo=dvc_repo)
    expected = file_hashes(dvc_repo / OUT)
    md5 = versioning.dvc_revision(dvc_repo / OUT)
    assert main(["data", "version", str(dvc_repo / OUT)]) == 0
    assert f"dvc_hash: {md5}" in capsys.readouterr().out

    versioning.run_dvc(["push"], repo=dvc_repo)  # the default remote is now s3
    stored = server.keys("panels/dvc/")
    assert len(stored) == N_SAMPLES + 2 and f"panels/dvc/files/md5/{md5[:2]}/{md5[2:]}" in stored, stored
    assert not (dvc_repo / ".dvcstore").exists()

    drop_output_and_cache(dvc_repo)
    versioning.run_dvc(["pull"], repo=dvc_repo)
    check_panel(dvc_repo / OUT, expected)
    assert versioning.dvc_revision(dvc_repo / OUT) == md5

    # Without an endpoint in config.local, botocore's own AWS_ENDPOINT_URL reaches the same server.
    versioning.run_dvc(["remote", "modify", "--local", "--unset", "s3", "endpointurl"], repo=dvc_repo)
    drop_output_and_cache(dvc_repo)
    versioning.run_dvc(["pull"], repo=dvc_repo, env={"AWS_ENDPOINT_URL": server.endpoint})
    check_panel(dvc_repo / OUT, expected)
