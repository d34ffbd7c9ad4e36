"""Offline checks of the container images in ``docker/`` and of the ``make pipeline`` scripts.

No Docker engine is needed: each Dockerfile is parsed into its instructions and checked for pinned
base images, a numeric non-root USER before the command, installation with the project's one
constraints file, no credentials in ENV/ARG, and a ``.dockerignore`` that keeps virtual
environments, data, runs and git history out of the build context. The scripts must be executable
and pass ``bash -n``.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
IMAGES = ["component", "ray-cpu", "ray-gpu"]
SCRIPTS = [REPO / "scripts" / "pipeline_up.sh", REPO / "scripts" / "pipeline_down.sh"]
CONSTRAINTS = "requirements/constraints.txt"
SECRET_WORDS = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------
# A small Dockerfile parser
# ------------------------------------------------------------------------------------------------

@dataclass
class Instruction:
    cmd: str      # upper-case keyword, e.g. "RUN"
    args: str     # the rest, continuation lines joined
    line: int     # 1-based line of the keyword


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (also inside a continued
    instruction, as Docker allows) and parser directives dropped. Heredocs are not supported."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        text = " ".join(part for part in pending if part)
        pending = []
        keyword, _, rest = text.partition(" ")
        assert "<<" not in rest or keyword.upper() != "RUN", f"{path}:{start}: heredocs are not parsed"
        instructions.append(Instruction(keyword.upper(), rest.strip(), start))
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (before the first FROM) and the build stages."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append(Stage(base, name, []))
        elif not result:
            assert ins.cmd == "ARG", f"line {ins.line}: only ARG may precede the first FROM"
            key, _, value = ins.args.partition("=")
            global_args[key.strip()] = value.strip().strip('"')
        else:
            result[-1].instructions.append(ins)
    return global_args, result


def key_values(ins: Instruction) -> dict[str, str]:
    """`ENV A=1 B=2`, `ENV A 1` and `ARG A=1` / `ARG A` as a dict (values unquoted)."""
    words = shlex.split(ins.args)
    if ins.cmd == "ENV" and words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return {k: v for k, _, v in (w.partition("=") for w in words)}


@dataclass
class Dockerfile:
    name: str                        # component, ray-cpu, ray-gpu
    path: Path
    instructions: list[Instruction]  # all of them, in order
    stages: list[Stage]              # the build stages; the last one is the image


@pytest.fixture(scope="module", params=IMAGES)
def dockerfile(request) -> Dockerfile:
    path = DOCKER / f"{request.param}.Dockerfile"
    assert path.is_file(), f"{path} missing"
    instructions = parse_dockerfile(path)
    _, build_stages = stages(instructions)
    return Dockerfile(request.param, path, instructions, build_stages)


def constraint_pin(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)$", (REPO / CONSTRAINTS).read_text(), re.MULTILINE | re.IGNORECASE)
    assert match, f"{CONSTRAINTS} pins no {package}"
    return match.group(1)


# ------------------------------------------------------------------------------------------------
# Dockerfiles
# ------------------------------------------------------------------------------------------------

def test_parser_joins_continuations_and_drops_comments(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("# syntax=docker/dockerfile:1\nARG BASE=python:3.11-slim\nFROM ${BASE} AS a\n"
                    "RUN echo one \\\n    # a comment inside\n    && echo two\nENV A=1 B=\"x y\"\n")
    _, [stage] = stages(parse_dockerfile(path))
    assert stage.base == "python:3.11-slim" and stage.name == "a"
    run, env = stage.instructions
    assert run.args == "echo one && echo two" and run.line == 4
    assert key_values(env) == {"A": "1", "B": "x y"}


def test_base_images_are_pinned(dockerfile):
    path, build_stages = dockerfile.path, dockerfile.stages
    earlier: set[str] = set()
    for stage in build_stages:
        if stage.base in earlier:
            continue
        assert "$" not in stage.base, f"{path}: FROM {stage.base}: unresolved build argument"
        image, _, digest = stage.base.partition("@")
        last = image.rsplit("/", 1)[-1]
        tag = last.rsplit(":", 1)[1] if ":" in last else None
        assert digest.startswith("sha256:") or (tag and tag != "latest"), \
            f"{path}: FROM {stage.base} is not pinned by tag or digest"
        if stage.name:
            earlier.add(stage.name)


def test_base_images_match_the_pinned_stack(dockerfile):
    name, path, build_stages = dockerfile.name, dockerfile.path, dockerfile.stages
    runtime = build_stages[-1].base
    for stage in build_stages:
        if stage.base.startswith("python:"):
            assert stage.base.split(":")[1].startswith("3.11-"), f"{path}: Python 3.11 is the project's Python"
    if name == "component":
        assert runtime.startswith("python:3.11-slim-bookworm")
    else:
        ray = constraint_pin("ray")
        flavour = r"cpu" if name == "ray-cpu" else r"cu12\d"
        assert re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-py311-{flavour}(@sha256:[0-9a-f]{{64}})?", runtime), \
            f"{path}: FROM {runtime} (want rayproject/ray:{ray}-py311-{flavour}: the ray pin of {CONSTRAINTS})"


def test_runs_as_numeric_non_root_user(dockerfile):
    path, build_stages = dockerfile.path, dockerfile.stages
    final = build_stages[-1].instructions
    users = [(i, ins) for i, ins in enumerate(final) if ins.cmd == "USER"]
    assert users, f"{path}: the final stage sets no USER"
    last_index, last_user = users[-1]
    user = last_user.args.split(":")[0]
    assert re.fullmatch(r"\d+", user), f"{path}: USER {last_user.args}: use a numeric uid (runAsNonRoot)"
    assert int(user) != 0, f"{path}: the final USER is root"
    for i, ins in enumerate(final):
        if ins.cmd in {"CMD", "ENTRYPOINT"}:
            assert i > last_index, f"{path}:{ins.line}: {ins.cmd} before the final non-root USER"


def test_installs_with_the_project_constraints_file(dockerfile):
    path, instructions, build_stages = dockerfile.path, dockerfile.instructions, dockerfile.stages
    copied_to = None
    for stage in build_stages:
        for ins in stage.instructions:
            if ins.cmd == "COPY":
                words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
                if CONSTRAINTS in words[:-1]:
                    copied_to = words[-1]
    assert copied_to, f"{path}: {CONSTRAINTS} is never copied in"
    installs = [ins for ins in instructions if ins.cmd == "RUN" and "pip install" in ins.args
                and ("hescape" in ins.args or " . " in f"{ins.args} ")]
    assert installs, f"{path}: no pip install of the project"
    for ins in installs:
        match = re.search(r"(?:-c|--constraint)[ =](\S+)", ins.args)
        assert match and match.group(1).endswith("constraints.txt"), f"{path}:{ins.line}: pip install without -c"
        assert match.group(1) == copied_to or copied_to.endswith("/"), \
            f"{path}:{ins.line}: -c {match.group(1)} is not the copied {copied_to}"


def test_no_credentials_in_the_image(dockerfile):
    path, instructions = dockerfile.path, dockerfile.instructions
    for ins in instructions:
        if ins.cmd in {"ENV", "ARG"}:
            for key, value in key_values(ins).items():
                assert not (SECRET_WORDS.search(key) and value), f"{path}:{ins.line}: {ins.cmd} {key} has a value"
                assert not key.startswith(("AWS_", "PG", "MLFLOW_TRACKING_PASSWORD")), f"{path}:{ins.line}: {key}"
        if ins.cmd in {"COPY", "ADD"}:
            assert not re.search(r"(^|[\s/])(\.env|\.aws|\.kube|[^\s]*\.pem|[^\s]*secret[^\s]*)(\s|$)",
                                 ins.args, re.IGNORECASE), f"{path}:{ins.line}: copies credentials: {ins.args}"


def test_component_image_runs_the_cli(dockerfile):
    name, path, build_stages = dockerfile.name, dockerfile.path, dockerfile.stages
    final = build_stages[-1].instructions
    entrypoints = [ins for ins in final if ins.cmd == "ENTRYPOINT"]
    healthchecks = [ins for ins in final if ins.cmd == "HEALTHCHECK"]
    if name == "component":
        assert entrypoints and entrypoints[-1].args == '["hescape"]', f"{path}: ENTRYPOINT must be the hescape CLI"
    else:
        # KubeRay sets the command of every Ray container; the image must not hide it.
        assert not entrypoints, f"{path}: Ray images keep the base image's entrypoint"
    assert len(healthchecks) <= 1


def test_dockerfile_sources_survive_dockerignore(dockerfile):
    """The build context keeps what the Dockerfiles copy (and .dockerignore keeps the rest out)."""
    path, instructions = dockerfile.path, dockerfile.instructions
    patterns = _dockerignore()
    for ins in instructions:
        if ins.cmd != "COPY" or "--from=" in ins.args:
            continue
        sources = [w for w in shlex.split(ins.args) if not w.startswith("--")][:-1]
        for source in sources:
            if "[" in source:  # optional files (params.yam[l]): checked when present
                continue
            assert (REPO / source.rstrip("/")).exists(), f"{path}:{ins.line}: {source} not in the repository"
            assert not _ignored(source.rstrip("/"), patterns), f"{path}:{ins.line}: {source} is in .dockerignore"


# ------------------------------------------------------------------------------------------------
# .dockerignore and scripts
# ------------------------------------------------------------------------------------------------

def _dockerignore() -> list[str]:
    path = REPO / ".dockerignore"
    assert path.is_file(), ".dockerignore missing at the repository root (the build context)"
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _ignored(relpath: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        parts = relpath.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, c) for c in candidates for prefix in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("path", [".venv", "data", "mlruns", ".git", "runs", "mlartifacts", ".dvc/cache",
                                  "data/panels/x.parquet", ".venv/bin/python", "src/x/__pycache__"])
def test_dockerignore_keeps_local_state_out(path):
    assert _ignored(path, _dockerignore()), f"{path} would be sent to the Docker build context"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable_and_parse(script):
    assert script.is_file(), f"{script} missing"
    assert script.stat().st_mode & 0o111, f"{script} is not executable"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()
    proc = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_pipeline_script_builds_every_dockerfile():
    text = SCRIPTS[0].read_text()
    for name in IMAGES:
        assert f"docker/{name}.Dockerfile" in text, f"pipeline_up.sh does not build docker/{name}.Dockerfile"
    # Fail fast, with a message, when a tool is missing.
    for tool in ("docker", "kind", "helm"):
        assert re.search(rf"^need {tool} ", text, re.MULTILINE), f"pipeline_up.sh does not check for {tool}"
