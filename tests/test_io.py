"""Atomic writes: complete or absent, never half-written; concurrent builders of one target."""

from __future__ import annotations

import threading

import pytest

from hescape.io import atomic_dir, atomic_file


def test_atomic_dir_appears_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "part").write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "part").write_text("whole")
    assert (target / "part").read_text() == "whole"
    with pytest.raises(FileExistsError), atomic_dir(target):
        pass
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "part").write_text("new")
    assert (target / "part").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or backup left behind


def test_keep_existing_lets_the_first_finished_copy_win(tmp_path):
    target = tmp_path / "cache"
    barrier = threading.Barrier(4)
    errors = []

    def build(i):
        try:
            with atomic_dir(target, overwrite=True, keep_existing=True) as tmp:
                barrier.wait()  # all four are building at once
                (tmp / "who").write_text(str(i))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (target / "who").read_text() in {"0", "1", "2", "3"}
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_atomic_file(tmp_path):
    path = tmp_path / "f.json"
    with pytest.raises(ValueError), atomic_file(path) as fh:
        fh.write("{")
        raise ValueError
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with atomic_file(path) as fh:
        fh.write("{}")
    assert path.read_text() == "{}"
