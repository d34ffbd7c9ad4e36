"""Atomic writes: everything the platform writes appears complete or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``target`` only on success.

    On an exception the temporary directory is removed and ``target`` is untouched.
    ``keep_existing`` is for content-addressed targets (shards, feature caches) that several
    processes may build at once, e.g. RayJobs on a shared volume: whoever finishes first wins and
    the others discard their identical copy instead of replacing it under a reader.
    """
    target = Path(target)
    if target.exists() and not overwrite and not keep_existing:
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_existing and target.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if target.exists():
        # A unique name: processes on other machines may share this directory (and a pid).
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "content")
    try:
        os.replace(tmp, target)
    except OSError:
        if keep_existing and target.exists():  # another process got there between check and rename
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``target`` for writing; rename it over ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(target: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(target) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
