"""Embedding a whole split with a trained checkpoint, in parallel on Ray workers.

A test split of a real panel can hold 100,000+ spots, and a LoRA or fully fine-tuned trunk has to
run on every patch. The rows are cut into contiguous chunks, one Ray task per chunk (one per GPU,
or a fractional CPU slot), each task loads the checkpoint and embeds its slice with
:func:`hescape.train.checkpoint.embed_split`; the slices come back in row order and are
concatenated, so metrics are computed once on the gathered embeddings, never averaged over
workers.

The checkpoint files travel to the workers through Ray's object store (they need not share a disk
with the driver); the shards and the feature cache are read from the paths recorded in the
checkpoint, which every worker must see (as during training).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from hescape.train.checkpoint import SplitEmbeddings, embed_split, load_trained

FIELDS = ("image", "gene", "image_trunk", "gene_trunk")


def chunk_ranges(n: int, n_chunks: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most ``n_chunks`` contiguous, near-equal ``(start, stop)`` ranges.

    Examples
    --------
    >>> chunk_ranges(10, 3)
    [(0, 4), (4, 7), (7, 10)]
    """
    n_chunks = max(1, min(int(n_chunks), n)) if n else 1
    size, extra = divmod(n, n_chunks)
    out, start = [], 0
    for i in range(n_chunks):
        stop = start + size + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def concat_embeddings(parts: list[SplitEmbeddings]) -> SplitEmbeddings:
    """Concatenate slices in the given order (a field missing from any slice stays ``None``)."""
    merged = {}
    for name in FIELDS:
        values = [getattr(p, name) for p in parts]
        merged[name] = None if any(v is None for v in values) else np.concatenate(values)
    return SplitEmbeddings(**merged)


def split_size(checkpoint_dir: str | Path, split: str) -> int:
    """Number of rows of ``split`` in the shards the checkpoint was trained on."""
    import json

    from hescape.data.shards import Shards
    from hescape.train.loop import INFO_FILE

    info = json.loads((Path(checkpoint_dir) / INFO_FILE).read_text())
    return len(Shards(info["shards"]).split(split).obs)


def embed_local(checkpoint_dir: str | Path, split: str, *, rows: tuple[int, int] | None = None,
                batch_size: int = 256, return_trunk: bool = True, device: str = "cpu") -> SplitEmbeddings:
    """Embed ``split`` (or rows ``[start, stop)`` of it) in this process."""
    trained = load_trained(checkpoint_dir, device=device)
    return embed_split(trained, split, batch_size=batch_size, rows=slice(*rows) if rows else None,
                       return_trunk=return_trunk)


def _read_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _embed_task(files: dict[str, bytes], split: str, start: int, stop: int, batch_size: int,
                return_trunk: bool, use_gpu: bool, threads: int) -> SplitEmbeddings:
    """Body of one Ray task: materialise the checkpoint locally, embed rows ``[start, stop)``."""
    import torch

    # Fractional CPU slots: one torch thread per slot avoids oversubscribing small machines.
    torch.set_num_threads(max(1, threads))
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="hescape-ckpt-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return embed_local(tmp, split, rows=(start, stop), batch_size=batch_size, return_trunk=return_trunk,
                           device=device)


def embed_with_ray(checkpoint_dir: str | Path, split: str, n_workers: int, *, use_gpu: bool = False,
                   batch_size: int = 256, return_trunk: bool = True, cpus_per_worker: float = 0.5,
                   n_rows: int | None = None) -> SplitEmbeddings:
    """Embed a whole split on ``n_workers`` Ray tasks (contiguous row chunks), gathered in row order.

    Parameters
    ----------
    checkpoint_dir
        A checkpoint directory (``model.pt``, ``checkpoint.json``), e.g. from
        :func:`hescape.train.run.download_checkpoint`.
    split
        ``train``, ``val`` or ``test``.
    n_workers
        Number of chunks / Ray tasks; ``<= 1`` embeds in this process without Ray.
    use_gpu
        One GPU per task (the cluster schedules as many tasks at once as it has GPUs).
    batch_size
        Rows per forward pass inside a task.
    return_trunk
        Also return the trunk features (before the heads).
    cpus_per_worker
        CPU share of each task on CPU (fractional, so small machines still schedule other work).
    n_rows
        Number of rows of the split, when the caller knows it (saves opening the shards).

    Returns
    -------
    SplitEmbeddings
        Identical (up to floating-point summation order, which does not change here) to
        embedding the split in one process.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if n_workers <= 1:
        return embed_local(checkpoint_dir, split, batch_size=batch_size, return_trunk=return_trunk,
                           device="cuda" if use_gpu else "cpu")
    import ray

    from hescape.train.ray_train import ensure_ray

    ensure_ray()
    n = split_size(checkpoint_dir, split) if n_rows is None else n_rows
    ranges = chunk_ranges(n, n_workers)
    files_ref = ray.put(_read_dir(checkpoint_dir))  # shipped once, shared by every task
    options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": cpus_per_worker}
    threads = int(os.environ.get("HESCAPE_TORCH_THREADS", "1"))
    task = ray.remote(max_retries=2)(_embed_task).options(**options)
    refs = [task.remote(files_ref, split, lo, hi, batch_size, return_trunk, use_gpu, threads)
            for lo, hi in ranges]
    return concat_embeddings(ray.get(refs))  # ray.get keeps the order of refs: row order


def n_workers_for(requested: int, *, use_gpu: bool) -> int:
    """``requested`` if positive, else one worker per GPU (``use_gpu``) or per CPU of the Ray cluster."""
    if requested > 0:
        return requested
    import ray

    from hescape.train.ray_train import ensure_ray

    ensure_ray()
    resources = ray.cluster_resources()
    return max(1, math.floor(resources.get("GPU" if use_gpu else "CPU", 1)))
