"""Data and code versions: DVC commands, output hashes from ``dvc.lock``, the git commit.

Only DVC's command line and its documented files (``dvc.lock``, ``*.dvc``, ``.dvc/config.local``) are
used, never DVC's Python internals. DVC runs as ``python -m dvc`` of this interpreter, with this
interpreter's ``bin/`` first on ``PATH`` so that stage commands (``hescape ...``) resolve to the same
installation.

S3 remotes: the committed ``.dvc/config`` names a remote ``s3`` with a default URL;
:func:`configure_s3_remote` writes the real bucket/prefix and endpoint from the environment into the
git-ignored ``.dvc/config.local``. Credentials are never written: DVC's S3 client (botocore) reads
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` / ``AWS_PROFILE`` (and
``AWS_ENDPOINT_URL``) from the environment of each ``dvc`` call.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from hescape.errors import ConfigError, HescapeError

S3_REMOTE = "s3"
LOCAL_REMOTE = "local"
DEFAULT_S3_PREFIX = "dvc"

# Environment variables read by :func:`configure_s3_remote`, in order of preference.
ENV_BUCKET = "HESCAPE_S3_BUCKET"
ENV_PREFIX = "HESCAPE_S3_PREFIX"
ENV_ENDPOINT = ("HESCAPE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
ENV_REGION = "HESCAPE_S3_REGION"
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                  "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")

# Quiet, offline defaults for every dvc call (an explicit setting in the environment wins).
DVC_QUIET_ENV = {"DVC_NO_ANALYTICS": "1", "DVC_IGNORE_ISATTY": "1"}


class DvcError(HescapeError):
    """A ``dvc`` (or ``git``) command failed; the message carries the command, status and stderr."""

    def __init__(self, cmd: Sequence[str], returncode: int | None, stderr: str = "", *, cwd=None):
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr
        self.cwd = None if cwd is None else str(cwd)
        status = "timed out" if returncode is None else f"exit status {returncode}"
        where = f" in {self.cwd}" if self.cwd else ""
        detail = stderr.strip()
        super().__init__(f"`{' '.join(self.cmd)}`{where} failed ({status})" + (f":\n{detail}" if detail else ""))


#  Running dvc


def dvc_command() -> list[str]:
    """The argv prefix that runs DVC: this interpreter's ``-m dvc``, else ``dvc`` on ``PATH``."""
    if importlib.util.find_spec("dvc") is not None:
        return [sys.executable, "-m", "dvc"]
    exe = shutil.which("dvc")
    if exe is None:
        raise ConfigError("DVC is not installed (pip install 'dvc[s3]'; `make setup` installs it)")
    return [exe]


def dvc_env(extra: Mapping[str, str] | None = None, *, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a ``dvc`` call: ``base`` (default ``os.environ``) + ``extra``, quiet defaults,
    and this interpreter's ``bin/`` first on ``PATH`` so stage commands find ``hescape``."""
    env = dict(os.environ if base is None else base)
    env.update(extra or {})
    for key, value in DVC_QUIET_ENV.items():
        env.setdefault(key, value)
    bindir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        env["PATH"] = os.pathsep.join([bindir, path]) if path else bindir
    return env


def run_dvc(args: Sequence[str], *, repo: str | os.PathLike = ".", env: Mapping[str, str] | None = None,
            check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``dvc <args>`` in ``repo`` and return the completed process (text stdout/stderr).

    Parameters
    ----------
    args
        Arguments after ``dvc``, e.g. ``["push", "-r", "s3"]``.
    repo
        Working directory (a DVC repository or a directory inside one).
    env
        Extra environment variables (e.g. S3 credentials) on top of ``os.environ``.
    check
        Raise :class:`DvcError` (with DVC's stderr) on a non-zero exit status.
    timeout
        Seconds before the command is killed (raises :class:`DvcError`).
    """
    cmd = [*dvc_command(), *map(str, args)]
    shown = ["dvc", *map(str, args)]
    try:
        proc = subprocess.run(cmd, cwd=repo, env=dvc_env(env), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise DvcError(shown, None, stderr, cwd=Path(repo).resolve()) from exc
    if check and proc.returncode != 0:
        raise DvcError(shown, proc.returncode, proc.stderr or proc.stdout, cwd=Path(repo).resolve())
    return proc


#  Versions of data and code


def find_repo_root(path: str | os.PathLike = ".") -> Path | None:
    """The nearest directory at or above ``path`` that holds a ``.dvc/`` directory, or ``None``."""
    here = Path(path).resolve()
    if not here.is_dir():
        here = here.parent
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    return None


def read_lock(directory: str | os.PathLike = ".") -> dict:
    """Parsed ``dvc.lock`` of ``directory`` (``{}`` when there is none)."""
    path = Path(directory) / "dvc.lock"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _out_hash(entry: Mapping) -> str | None:
    algo = entry.get("hash", "md5")
    value = entry.get(algo) or entry.get("md5") or entry.get("etag")
    return None if value is None else str(value)


def dvc_revision(path: str | os.PathLike, repo: str | os.PathLike | None = None) -> str | None:
    """Hash DVC recorded for the tracked output ``path`` (e.g. ``"3f0c...e1.dir"`` for a directory).

    Looks in the ``dvc.lock`` files from ``path``'s directory up to the repository root (stage
    outputs), then in ``<path>.dvc`` (``dvc add``). The value is what the last ``dvc repro`` /
    ``dvc commit`` / ``dvc add`` recorded; the workspace is not rehashed. ``None`` when ``path`` is not
    a tracked output or there is no DVC repository.

    Parameters
    ----------
    path
        The output, absolute or relative to the current directory (or to ``repo`` when given).
    repo
        The repository root; found from ``path`` when omitted.
    """
    path = Path(path)
    if repo is not None and not path.is_absolute():
        path = Path(repo) / path
    path = Path(os.path.abspath(path))
    root = Path(repo).resolve() if repo is not None else find_repo_root(path)
    if root is None:
        return None
    try:
        path.relative_to(root)
    except ValueError:
        return None
    directory = path.parent
    while True:
        rel = os.path.relpath(path, directory).replace(os.sep, "/")
        for stage in (read_lock(directory).get("stages") or {}).values():
            for out in (stage or {}).get("outs") or []:
                if isinstance(out, Mapping) and str(out.get("path", "")).rstrip("/") == rel:
                    return _out_hash(out)
        if directory == root or directory == directory.parent:
            break
        directory = directory.parent
    dvcfile = path.with_name(path.name + ".dvc")
    if dvcfile.is_file():
        try:
            data = yaml.safe_load(dvcfile.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{dvcfile}: invalid YAML: {exc}") from exc
        for out in data.get("outs") or []:
            if isinstance(out, Mapping) and str(out.get("path", "")).rstrip("/") == path.name:
                return _out_hash(out)
    return None


def _git(args: Sequence[str], repo) -> str | None:
    if shutil.which("git") is None:
        return None
    try:
        proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit(repo: str | os.PathLike = ".") -> str | None:
    """Full hash of ``HEAD`` of the git repository around ``repo``; ``None`` outside git (or before the
    first commit)."""
    return _git(["rev-parse", "--verify", "-q", "HEAD"], repo) or None


def git_dirty(repo: str | os.PathLike = ".") -> bool | None:
    """Whether tracked files differ from ``HEAD`` (untracked files ignored); ``None`` outside git."""
    out = _git(["status", "--porcelain", "--untracked-files=no"], repo)
    return None if out is None else bool(out)


def data_version(path: str | os.PathLike, repo: str | os.PathLike | None = None) -> dict:
    """``{"path", "dvc_hash", "git_commit", "git_dirty"}`` of a data output, for run tags/params."""
    where = repo if repo is not None else (find_repo_root(path) or Path(path).parent)
    return {
        "path": str(path),
        "dvc_hash": dvc_revision(path, repo),
        "git_commit": git_commit(where),
        "git_dirty": git_dirty(where),
    }


#  Remotes


def s3_settings_from_env(env: Mapping[str, str] | None = None, *, bucket: str | None = None,
                         prefix: str | None = None, endpoint: str | None = None,
                         region: str | None = None) -> dict[str, str]:
    """The ``s3`` remote settings (``url``, ``endpointurl``, ``region``) from arguments, else the
    environment; only the ones that are set. Credentials are never part of it."""
    env = os.environ if env is None else env
    bucket = bucket or env.get(ENV_BUCKET)
    endpoint = endpoint or next((env[k] for k in ENV_ENDPOINT if env.get(k)), None)
    region = region or env.get(ENV_REGION)
    out: dict[str, str] = {}
    if bucket:
        bucket = bucket.removeprefix("s3://").strip("/")
        if not bucket or "/" in bucket:
            raise ConfigError(f"{ENV_BUCKET}: expected a bucket name, got {bucket!r} (put the path in {ENV_PREFIX})")
        prefix = (prefix if prefix is not None else env.get(ENV_PREFIX, DEFAULT_S3_PREFIX)).strip("/")
        out["url"] = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if endpoint:
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"S3 endpoint {endpoint!r} must start with http:// or https://")
        out["endpointurl"] = endpoint
    if region:
        out["region"] = region
    return out


def has_s3_credentials(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment names credentials botocore can use (keys, a profile, a role), or a
    shared credentials file exists."""
    env = os.environ if env is None else env
    if any(env.get(k) for k in CREDENTIAL_ENV):
        return True
    shared = env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")
    return os.path.isfile(shared)


def configure_s3_remote(repo: str | os.PathLike = ".", *, env: Mapping[str, str] | None = None,
                        bucket: str | None = None, prefix: str | None = None, endpoint: str | None = None,
                        region: str | None = None, default: bool = False) -> dict[str, str]:
    """Point the ``s3`` remote at the real bucket and endpoint, in the git-ignored ``.dvc/config.local``.

    Values come from the arguments, else from ``env`` (default ``os.environ``): ``HESCAPE_S3_BUCKET``,
    ``HESCAPE_S3_PREFIX`` (default ``dvc``), ``HESCAPE_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL``, ``HESCAPE_S3_REGION``. Unset values keep what ``.dvc/config`` says (an unset
    endpoint means AWS itself, or botocore's own ``AWS_ENDPOINT_URL`` at push time). Credentials are
    not written. With ``default=True`` the checkout's default remote becomes ``s3``.

    Returns the settings written (plus ``"core.remote"`` when ``default``).
    """
    settings = s3_settings_from_env(env, bucket=bucket, prefix=prefix, endpoint=endpoint, region=region)
    for key, value in settings.items():
        run_dvc(["remote", "modify", "--local", S3_REMOTE, key, value], repo=repo)
    written = dict(settings)
    if default:
        run_dvc(["remote", "default", "--local", S3_REMOTE], repo=repo)
        written["core.remote"] = S3_REMOTE
    return written
