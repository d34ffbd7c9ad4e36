"""``hescape tune``: the search space, resuming after an interruption, two processes sharing a study,
pruning, and the MLflow parent/child runs. Real parts: Optuna on SQLite files, an MLflow SQLite
store, ``hescape tune`` processes that are interrupted and killed, and Ray Train workers for the
trials of the pruning study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hescape.config import apply_overrides, section
from hescape.errors import ConfigError
from hescape.train.config import TrainConfig
from hescape.tune.config import SamplerConfig, tune_config
from hescape.tune.samplers import build_sampler
from hescape.tune.space import apply_values, format_value, parse_space, to_overrides
from hescape.tune.study import check_study_name, read_best_overrides

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


#  Search space and configuration (fast)


@pytest.mark.parametrize(("space", "message"), [
    ({"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}, "unknown type 'loguniform'"),
    ({"lr": {"type": "float", "low": 1e-2, "high": 1e-2}}, r"low \(0.01\) must be below high \(0.01\)"),
    ({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}, "unknown train key 'learning_rate'"),
    ({"lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, "needs low > 0"),
    ({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}}, "cannot be combined"),
    ({"lr": {"type": "float", "high": 1e-2}}, "'low' is required"),
    ({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "choices": [1]}}, r"unknown key\(s\) \['choices'\]"),
    ({"head_hidden": {"type": "int", "low": 64.5, "high": 512}}, "expected an integer"),
    ({"embed_dim": {"type": "categorical", "choices": []}}, "non-empty list"),
    ({"embed_dim": {"type": "categorical", "choices": ["wide", 128]}}, "not a valid value of train.embed_dim"),
    ({"image_head": {"type": "categorical", "choices": ["mlp", "mlp"]}}, "duplicate choices"),
    ({"lr": 0.001}, "expected a mapping with 'type'"),
    ({}, "non-empty mapping"),
])
def test_bad_search_space_entries_fail_clearly(space, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(space)


def test_default_space_and_config():
    cfg = tune_config({})
    specs = {s.name: s for s in parse_space(cfg.space)}
    assert set(specs) == {"temperature", "image_head", "gene_head", "head_hidden", "head_dropout", "embed_dim", "lr"}
    assert specs["temperature"].log and specs["lr"].log
    assert specs["embed_dim"].choices == (64, 128, 256)
    assert (cfg.trials, cfg.epochs, cfg.metric, cfg.direction) == (8, 2, "val_R_at_5", "maximize")
    for bad, message in [({"grace_period": 5, "heartbeat_interval": 5}, "must exceed"),
                         ({"pruner": {"type": "hyperband"}}, "tune.pruner.type"),
                         ({"metric": "val_R5"}, "not a per-epoch metric"),
                         ({"trials": 0}, "at least 1"),
                         ({"sampler": {"kind": "tpe"}}, "unknown key")]:
        with pytest.raises(ConfigError, match=message):
            tune_config({"tune": bad})
    with pytest.raises(ConfigError, match="study name"):
        check_study_name("bad name'")


def test_sampled_values_become_typed_train_overrides():
    values = {"lr": 1e-5, "temperature": 0.05, "image_head": "mlp", "head_hidden": 256, "embed_dim": 64}
    overrides = to_overrides(values)
    assert "train.lr=1.0e-05" in overrides  # PyYAML would read "1e-05" as a string
    cfg = section(apply_overrides({"train": {"epochs": 3}}, overrides), "train", TrainConfig)
    assert (cfg.lr, cfg.temperature, cfg.image_head, cfg.head_hidden, cfg.embed_dim, cfg.epochs) == (
        1e-5, 0.05, "mlp", 256, 64, 3)
    assert section(apply_values({"train": {"epochs": 3}}, values), "train", TrainConfig) == cfg
    assert format_value("a: b") == "'a: b'"


def test_sampler_is_seeded_per_trial_not_per_process():
    """Two processes on one study with the same seed must not propose the same values."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    specs = parse_space({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                         "image_head": {"type": "categorical", "choices": ["linear", "mlp"]}})
    storage = optuna.storages.InMemoryStorage()
    cfg = SamplerConfig(type="tpe", seed=0, n_startup_trials=2)
    a = optuna.create_study(study_name="shared", storage=storage, sampler=build_sampler(cfg), direction="maximize")
    b = optuna.load_study(study_name="shared", storage=storage, sampler=build_sampler(cfg))
    for i in range(6):
        study = (a, b)[i % 2]
        trial = study.ask()
        values = {s.name: s.suggest(trial) for s in specs}
        study.tell(trial, values["lr"])
    lrs = [t.params["lr"] for t in a.trials]
    assert len(set(lrs)) == len(lrs)
    # The same trial number gets the same draw in any process (reproducible studies).
    alone = optuna.create_study(sampler=build_sampler(cfg), direction="maximize")
    assert alone.ask().suggest_float("lr", 1e-4, 1e-2, log=True) == lrs[0]


def test_storage_url_precedence_and_redaction(tmp_path, monkeypatch):
    from hescape.tune.storage import redact, resolve_storage_url

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPTUNA_STORAGE_URL", raising=False)
    assert resolve_storage_url(None, "sqlite:///studies/optuna.db") == f"sqlite:///{tmp_path}/studies/optuna.db"
    monkeypatch.setenv("OPTUNA_STORAGE_URL", "postgresql://hescape:secret@postgres:5432/optuna")
    assert resolve_storage_url(None, "sqlite:///optuna.db").startswith("postgresql://")  # the cluster's wins
    assert resolve_storage_url("sqlite:////abs/o.db", "sqlite:///optuna.db") == "sqlite:////abs/o.db"  # --storage
    assert redact("postgresql://hescape:secret@postgres:5432/optuna") == "postgresql://hescape:***@postgres:5432/optuna"


def test_cli_reports_a_bad_space_with_status_2(tmp_path, capsys):
    from hescape.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tune": {"space": {"lr": {"type": "float", "low": 1.0, "high": 0.1}}}}))
    rc = main(["tune", "--panel", str(tmp_path), "--study", "s", "--params", str(params)])
    assert rc == 2
    assert "tune.space.lr: low (1.0) must be below high (0.1)" in capsys.readouterr().err


#  Studies (slow): a small simulated panel, its shards and frozen features built once for the module


@pytest.fixture(scope="module")
def tune_env(tmp_path_factory):
    """Panel (800 spots, 32 px), warm shards + feature cache, MLflow store; the environment of a run."""
    from hescape.data.simulate import SimulationConfig, simulate_to_dir
    from hescape.train.run import prepare

    root = tmp_path_factory.mktemp("tune")
    panel = root / "panel"
    simulate_to_dir(SimulationConfig(name="tunepanel", n_spots=800, patch_px=32, seed=3), panel)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "HESCAPE_ARTIFACT_ROOT": str(root / "mlartifacts"),
           "HESCAPE_TORCH_THREADS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.chdir(root)
        prepare(panel, study_params(root), progress=False)  # every trial and process reuses the cache
        # The processes run as a user would run them (MLflow checks sessions harder under pytest).
        proc_env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
        yield {"root": root, "panel": panel, "env": {**proc_env, **env}}


def study_params(root: Path, **tune) -> dict:
    return {
        "preprocess": {"image_size": 32, "out_dir": str(root / "shards")},
        "train": {"batch_size": 32, "warmup_steps": 0, "num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 0,
                  "cache_dir": str(root / "cache"), "storage_path": str(root / "ray")},
        "tune": {"trials": 4, "epochs": 2, "heartbeat_interval": 1, "grace_period": 2,
                 "sampler": {"n_startup_trials": 2}, "best_params_out": str(root / "best" / "{study}.yaml"),
                 **tune},
    }


def mlflow_client():
    from mlflow.tracking import MlflowClient

    from hescape.tracking import tracking_uri

    return MlflowClient(tracking_uri())


def study_runs(study_name: str):
    """(parent runs, child runs) of a study in the MLflow store, deleted ones excluded."""
    from mlflow.entities import ViewType

    client = mlflow_client()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`hescape.study` = '{study_name}'", run_view_type=ViewType.ACTIVE_ONLY,
                              max_results=1000)
    parents = [r for r in runs if r.data.tags.get("hescape.kind") == "tune-study"]
    children = [r for r in runs if r.data.tags.get("hescape.kind") == "tune-trial"]
    return parents, children


def tune_cmd(env: dict, name: str, storage: str, params: dict, *extra: str) -> list[str]:
    path = env["root"] / f"{name}.params.yaml"
    path.write_text(yaml.safe_dump(params))
    return [sys.executable, "-m", "hescape.cli", "tune", "--panel", str(env["panel"]), "--study", name,
            "--storage", storage, "--params", str(path), "--local", *extra]


@pytest.fixture
def start(tune_env):
    """``start(cmd)`` runs a ``hescape tune`` process; any still running when the test ends is killed."""
    procs = []

    def run(cmd: list[str], env: dict) -> subprocess.Popen:
        procs.append(subprocess.Popen(cmd, cwd=env["root"], env=env["env"], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        return procs[-1]

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def load(name: str, storage):
    return optuna.load_study(study_name=name, storage=storage)


def rdb(env: dict, name: str):
    """The test's own connection to a study's SQLite file (tables created before any process starts)."""
    return optuna.storages.RDBStorage(f"sqlite:///{env['root'] / f'{name}.db'}",
                                      engine_kwargs={"connect_args": {"timeout": 60}})


def wait_until(proc: subprocess.Popen, predicate, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"hescape tune exited early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        try:
            if predicate():
                return
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("timed out waiting for the study")


def finish(proc: subprocess.Popen, timeout: float = 240.0) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a process behind
        out, _ = proc.communicate()
        raise AssertionError(f"hescape tune did not finish in {timeout} s:\n{out[-4000:]}") from None
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_resume_after_interruption(tune_env, start):
    """Ctrl-C, then a hard kill mid-trial, then the same command again: the study reaches its total."""
    name, total = "resume", 4
    storage = rdb(tune_env, name)
    cmd = tune_cmd(tune_env, name, storage.url, study_params(tune_env["root"]), "--trials", str(total))

    def running_after(n_finished):
        def check():
            trials = load(name, storage).get_trials(deepcopy=False)
            return (sum(t.state in FINISHED for t in trials) >= n_finished
                    and any(t.state == TrialState.RUNNING for t in trials))
        return check

    # 1. Ctrl-C while a trial trains, after the first trial finished: the trial is recorded as failed.
    proc = start(cmd, tune_env)
    wait_until(proc, running_after(1))
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == 130, out[-4000:]
    assert "run the same command again" in out
    after_sigint = load(name, storage).trials
    assert 1 <= sum(t.state in FINISHED for t in after_sigint) < total

    # 2. A hard kill (a preempted pod) mid-trial leaves the trial RUNNING, its heartbeat stopped.
    proc = start(cmd, tune_env)
    wait_until(proc, lambda: any(t.state == TrialState.RUNNING and t.number >= len(after_sigint)
                                 for t in load(name, storage).get_trials(deepcopy=False)))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    trials = load(name, storage).trials
    killed = [t for t in trials if t.state == TrialState.RUNNING]
    assert len(killed) == 1, ([(t.number, t.state.name, t.user_attrs) for t in trials], proc.stdout.read()[-4000:])
    killed = killed[0]

    # 3. Again: the dead trial is failed and queued again, and the study reaches the requested total.
    out = finish(start(cmd, tune_env))
    trials = load(name, storage).trials
    assert sum(t.state in FINISHED for t in trials) == total, [(t.number, t.state.name) for t in trials]
    assert [t.number for t in trials] == list(range(len(trials)))  # no duplicate or skipped numbers
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state in FINISHED
    if trials[killed.number].params:  # killed after sampling: the same values are tried again
        assert retries[0].params == trials[killed.number].params
    assert f"study {name}:" in out

    # One parent run for all three processes; every trial's run is its child.
    parents, children = study_runs(name)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and "best_value" in parent.data.metrics
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    by_number = {}
    for child in children:
        by_number.setdefault(int(child.data.tags["hescape.trial"]), []).append(child)
    for t in trials:
        if t.state in FINISHED:
            (run,) = by_number[t.number]
            assert run.data.tags["hescape.trial_state"] == t.state.name.lower()  # complete | pruned
    for run in by_number.get(killed.number, []):  # killed before its run existed: nothing to close
        assert run.info.status == "KILLED" and run.data.tags["hescape.trial_state"] == "failed"
    for t in after_sigint:
        if t.state == TrialState.FAIL:  # FAILED by train_run, or KILLED if interrupted while being created
            for run in by_number.get(t.number, []):
                assert run.info.status in ("FAILED", "KILLED") and run.data.tags["hescape.trial_state"] == "failed"
    assert not [c for c in children if c.info.status == "RUNNING"]


@pytest.mark.slow
def test_two_processes_share_one_study(tune_env, start):
    name, total = "shared", 4
    storage = rdb(tune_env, name)
    # Longer trials without pruning, so that neither process finishes the study before the other starts.
    params = study_params(tune_env["root"], epochs=3, pruner={"type": "none"})
    cmd = tune_cmd(tune_env, name, storage.url, params, "--trials", str(total))
    procs = [start(cmd, tune_env) for _ in range(2)]
    outs = [finish(p) for p in procs]

    trials = load(name, storage).trials
    done = [t for t in trials if t.state in FINISHED]
    assert len(done) == total
    # A trial created in the same instant by both processes for the last slot is not run (rare).
    assert all(t.user_attrs.get("surplus") for t in trials if t.state not in FINISHED)
    assert len({t.user_attrs["process"] for t in done}) == 2, "both processes must have run trials"
    parents, children = study_runs(name)
    assert len(parents) == 1 and len(children) == total
    best = yaml.safe_load((tune_env["root"] / "best" / f"{name}.yaml").read_text())
    assert best["trials"]["complete"] == total
    for out in outs:
        assert f"best value {best['best_value']:.4f} (trial {best['best_trial']})" in out


@pytest.fixture(scope="module")
def pruned_study(tune_env, ray_session):
    """A study on Ray Train workers: a learning trial, then one whose lr cannot learn (pruned)."""
    from hescape.tune.study import run_study

    name = "pruning"
    storage = rdb(tune_env, name)
    params = study_params(tune_env["root"], trials=2, epochs=2,
                          space={"lr": {"type": "float", "low": 1e-7, "high": 1e-2, "log": True},
                                 "image_head": {"type": "categorical", "choices": ["linear", "mlp"]}},
                          pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study.enqueue_trial({"lr": 3e-3, "image_head": "linear"})
    study.enqueue_trial({"lr": 1e-7, "image_head": "mlp"})
    # tune_env's environment (MLflow store, working directory) is in force for the whole module.
    result = run_study(tune_env["panel"], params, study_name=name, storage=storage.url, local=False)
    return {"result": result, "study": load(name, storage), "runs": study_runs(name)}


@pytest.mark.slow
def test_pruning_stops_a_poor_trial_early(pruned_study):
    good, bad = pruned_study["study"].trials
    assert good.state == TrialState.COMPLETE and bad.state == TrialState.PRUNED
    assert sorted(good.intermediate_values) == [0, 1]
    assert sorted(bad.intermediate_values) == [0]  # judged after its first epoch, then stopped
    assert bad.intermediate_values[0] < good.intermediate_values[0]

    client = mlflow_client()
    _, children = pruned_study["runs"]
    run = {int(c.data.tags["hescape.trial"]): c for c in children}
    assert run[bad.number].data.tags["hescape.trial_state"] == "pruned"
    assert run[good.number].data.tags["hescape.trial_state"] == "complete"
    bad_epochs = client.get_metric_history(run[bad.number].info.run_id, "val_R_at_5")
    good_epochs = client.get_metric_history(run[good.number].info.run_id, "val_R_at_5")
    assert len(bad_epochs) == 1 < len(good_epochs) == 2
    assert client.get_metric_history(run[bad.number].info.run_id, "stopped_by_hook")[-1].value == 1.0
    assert good.value == pytest.approx(max(m.value for m in good_epochs))


@pytest.mark.slow
def test_mlflow_parent_and_child_runs(pruned_study, tmp_path):
    result, study = pruned_study["result"], pruned_study["study"]
    (parent,), children = pruned_study["runs"]
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"
    assert len(children) == 2
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.experiment_id == parent.info.experiment_id
        assert child.info.run_name == f"pruning-trial-{child.data.tags['hescape.trial']}"
        trial = study.trials[int(child.data.tags["hescape.trial"])]
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        # The trial's sampled values, as searched values and as the run's own training config.
        assert float(child.data.params["tune.lr"]) == pytest.approx(trial.params["lr"])
        assert float(child.data.params["train.lr"]) == pytest.approx(trial.params["lr"])
        assert child.data.params["train.image_head"] == trial.params["image_head"]
        assert child.data.params["train.epochs"] == "2"  # tune.epochs
    # Best parameters: on the parent (tags, metric, artifact) and in the file the final training reads.
    best = study.best_trial
    assert parent.data.tags["best.train.lr"] == format_value(best.params["lr"])
    assert parent.data.tags["best.trial"] == str(best.number)
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.params["tune.pruner.type"] == "median"
    assert parent.data.params["tune.space.lr.low"] == "1e-07"
    client = mlflow_client()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert artifacts == {f"tune/{result.best_params_path.name}", "tune/trials.csv"}
    overrides = read_best_overrides(result.best_params_path)
    assert overrides == result.overrides == to_overrides(best.params)
    cfg = section(apply_overrides({}, overrides), "train", TrainConfig)
    assert (cfg.lr, cfg.image_head) == (pytest.approx(best.params["lr"]), best.params["image_head"])
    downloaded = client.download_artifacts(parent.info.run_id, f"tune/{result.best_params_path.name}", str(tmp_path))
    assert yaml.safe_load(Path(downloaded).read_text())["best_trial"] == best.number
