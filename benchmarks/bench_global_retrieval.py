"""Global retrieval in query chunks: time and peak memory against the dense N x N computation.

Claims measured here (issue 4 item 1): a 100,000 x 100,000 global evaluation runs on this machine
because memory stays O(chunk x N), and chunking costs little time where the dense matrix still fits.

Each configuration runs in a fresh Python process, so its peak resident memory (``ru_maxrss``) is its
own; the peak reported is the growth beyond the process's size once the embeddings exist. Baselines
are measured in the same run.

    .venv/bin/python benchmarks/bench_global_retrieval.py            # N = 100,000 and 10,000
    .venv/bin/python benchmarks/bench_global_retrieval.py --n 20000  # a quicker large case
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DIM = 128
CHUNK = 2048


def _child(n: int, chunk_size: int, seed: int) -> None:
    """One configuration: random float32 embeddings, both retrieval directions, JSON on stdout."""
    import numpy as np
    import torch

    from hescape.evaluate.retrieval import global_retrieval, true_partner_ranks

    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, DIM), dtype=np.float32)
    # Partners share a signal under three times as much noise (cosine ~0.3): ranks spread over the set.
    gene = (img + 3.0 * rng.standard_normal((n, DIM), dtype=np.float32)).astype(np.float32)
    torch.zeros(1)  # load torch's kernels before the baseline is taken
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = global_retrieval(img, gene, chunk_size=chunk_size)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ranks = true_partner_ranks(img[:2000], gene[:2000], chunk_size=chunk_size) if n <= 10_000 else None
    print(json.dumps({
        "n": n, "chunk_size": chunk_size, "seconds": seconds, "peak_extra_bytes": (peak_kb - base_kb) * 1024,
        "i2g_R@10": result["I2G"]["R@10"], "g2i_mean_rank": result["G2I"]["mean_rank"],
        "ranks_head": None if ranks is None else ranks.tolist(),
    }))


def _run(n: int, chunk_size: int, seed: int = 0) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(n), str(chunk_size), str(seed)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="size of the large (chunked only) case")
    parser.add_argument("--small", type=int, default=10_000, help="size where chunked and dense both run")
    parser.add_argument("--repeats", type=int, default=3, help="timings of the small case (best is kept)")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    print(f"global retrieval, random float32 embeddings, d={DIM}, both directions (I2G + G2I)")
    big = _run(args.n, CHUNK)
    dense_bytes = 4 * args.n * args.n
    print(f"N={args.n:,} chunk {CHUNK}: {big['seconds']:.1f} s, peak extra memory {_gb(big['peak_extra_bytes'])}; "
          f"dense N x N float32 matrix {_gb(dense_bytes)}; peak / dense = {big['peak_extra_bytes'] / dense_bytes:.4f}")
    print(f"  (R@10 I2G {big['i2g_R@10']:.4f}, mean rank G2I {big['g2i_mean_rank']:.1f})")

    n = args.small
    chunked = min((_run(n, CHUNK) for _ in range(args.repeats)), key=lambda r: r["seconds"])
    dense = min((_run(n, n) for _ in range(args.repeats)), key=lambda r: r["seconds"])
    same = chunked["ranks_head"] == dense["ranks_head"] and chunked["i2g_R@10"] == dense["i2g_R@10"] \
        and chunked["g2i_mean_rank"] == dense["g2i_mean_rank"]
    print(f"N={n:,}: chunked ({CHUNK}) {chunked['seconds']:.2f} s, dense (one {n:,} x {n:,} chunk) "
          f"{dense['seconds']:.2f} s; time chunked / dense = {chunked['seconds'] / dense['seconds']:.2f}; "
          f"peak memory chunked / dense = {chunked['peak_extra_bytes'] / max(dense['peak_extra_bytes'], 1):.3f}; "
          f"results identical: {same}")


if __name__ == "__main__":
    main()
