"""Where the training loop runs: inside a Ray Train worker, or in this process alone.

The loop talks only to this small interface (rank, world size, report, latest checkpoint), so the
same per-worker function serves ``hescape train`` (Ray), ``hescape tune`` (Ray) and quick
single-process debugging; Ray stays an adapter at the edge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol


class WorkerContext(Protocol):
    rank: int
    world_size: int

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> Path | None: ...


class LocalContext:
    """Single process; keeps the latest and the best checkpoint under ``storage``."""

    rank = 0
    world_size = 1

    def __init__(self, storage: str | Path, *, score: str = "val_loss", mode: str = "min"):
        self.storage = Path(storage)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.score, self.sign = score, (1.0 if mode == "min" else -1.0)
        self.history: list[dict] = []

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir is None:
            return
        latest = self.storage / "latest"
        if latest.exists():
            shutil.rmtree(latest)
        shutil.copytree(checkpoint_dir, latest)
        (latest / "metrics.json").write_text(json.dumps(metrics))
        best = self.storage / "best"
        best_metrics = json.loads((best / "metrics.json").read_text()) if (best / "metrics.json").exists() else None
        if best_metrics is None or self.sign * metrics[self.score] < self.sign * best_metrics[self.score]:
            if best.exists():
                shutil.rmtree(best)
            shutil.copytree(latest, best)

    def latest_checkpoint(self) -> Path | None:
        latest = self.storage / "latest"
        return latest if latest.exists() else None

    def best_checkpoint(self) -> Path | None:
        best = self.storage / "best"
        return best if best.exists() else None


class RayContext:
    """Inside a Ray Train worker (imports Ray lazily)."""

    def __init__(self):
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self._restored = None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = None
        if checkpoint_dir is not None and self.rank == 0:
            checkpoint = self._train.Checkpoint.from_directory(checkpoint_dir)
        self._train.report(metrics, checkpoint=checkpoint)

    def latest_checkpoint(self) -> Path | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        # Materialise locally (works for remote storage too); kept for the worker's lifetime.
        self._restored = checkpoint.to_directory()
        return Path(self._restored)
