"""Cross-modal retrieval: Recall@k, mean and median rank, in two protocols.

``batch``  the published protocol: consecutive test mini-batches of 64 pairs in dataset order, each
           query ranked against the 64 candidates of its batch, averaged over batches.
``global`` every test pair is a candidate for every query. Computed in query chunks, so memory is
           O(chunk x N) rather than O(N^2): a 100,000 x 100,000 evaluation runs on a laptop.

Ranks are 1-based; a tie with the true partner counts against it (pessimistic), so a constant
embedding scores chance-like rather than perfect.
"""

from __future__ import annotations

import numpy as np
import torch

KS = (1, 5, 10)
#: Rows whose ties are counted at once within a chunk (bounds the counting temporaries).
COUNT_ROWS = 256


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def true_partner_ranks(queries, candidates, *, normalize: bool = True, chunk_size: int = 2048) -> np.ndarray:
    """1-based rank of candidate ``i`` for query ``i`` among all candidates (dot product similarity).

    Ties with the true partner count against it; a pair whose similarity is NaN ranks last.
    Memory: one ``chunk_size x len(candidates)`` float32 buffer, plus ``256 x len(candidates)`` x 5
    bytes for counting.
    """
    q, c = _as_tensor(queries), _as_tensor(candidates)
    if q.shape != c.shape:
        raise ValueError(f"queries {tuple(q.shape)} and candidates {tuple(c.shape)} must pair one to one")
    if normalize:
        q, c = _normalize(q), _normalize(c)
    else:
        q, c = q.float(), c.float()
    n = q.shape[0]
    ranks = np.empty(n, dtype=np.int64)
    if n == 0:
        return ranks
    rows_per_chunk = min(chunk_size, n)
    # One similarity buffer for every chunk: a fresh product per chunk would hold the previous
    # chunk's matrix until the assignment (twice the memory at peak) and page in new memory each time.
    sims_buf = torch.empty((rows_per_chunk, n), dtype=q.dtype, device=q.device)
    # Ties are counted COUNT_ROWS rows at a time: torch's sum first casts the whole mask to its
    # accumulator type, a chunk-sized int32 (or twice that, int64) temporary for a whole chunk.
    count_rows = min(COUNT_ROWS, rows_per_chunk)
    mask_buf = torch.empty((count_rows, n), dtype=torch.bool, device=q.device)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            sims = torch.matmul(q[start:stop], c.T, out=sims_buf[: stop - start])
            # A NaN similarity (a diverged model) compares False with everything, which would give
            # its pair rank 0, better than perfect; as -inf it ranks last, and a NaN candidate
            # never outranks a true partner.
            sims.nan_to_num_(nan=float("-inf"))
            rows = torch.arange(stop - start, device=sims.device)
            true = sims[rows, rows + start].unsqueeze(1)
            # Counting every candidate scoring >= the partner (the partner included) gives the
            # 1-based rank with ties counted against the partner.
            for lo in range(0, stop - start, count_rows):
                hi = min(stop - start, lo + count_rows)
                mask = torch.ge(sims[lo:hi], true[lo:hi], out=mask_buf[: hi - lo])
                counts = mask.view(torch.uint8).sum(dim=1, dtype=torch.int32)
                ranks[start + lo:start + hi] = counts.cpu().numpy()
    return ranks


def summarize_ranks(ranks: np.ndarray, n_candidates: int, ks=KS) -> dict[str, float]:
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["mean_rank"] = float(np.mean(ranks))
    out["median_rank"] = float(np.median(ranks))
    out.update({f"chance_R@{k}": min(1.0, k / n_candidates) for k in ks})
    return out


def global_retrieval(image_emb, gene_emb, *, normalize: bool = True, chunk_size: int = 2048, ks=KS) -> dict:
    """Both directions against the whole set: ``{"I2G": {...}, "G2I": {...}}``."""
    n = len(image_emb)
    return {
        "I2G": summarize_ranks(true_partner_ranks(image_emb, gene_emb, normalize=normalize, chunk_size=chunk_size),
                               n, ks),
        "G2I": summarize_ranks(true_partner_ranks(gene_emb, image_emb, normalize=normalize, chunk_size=chunk_size),
                               n, ks),
    }


def batch_retrieval(image_emb, gene_emb, *, batch_size: int = 64, normalize: bool = True, ks=KS,
                    drop_last: bool = False) -> dict:
    """The published protocol: consecutive batches in dataset order, metrics averaged over batches.

    A final partial batch is kept (``drop_last=False``) and weighted like any other batch, as the
    reference's per-batch averaging does; its chance level differs, so the reported chance level is
    the average of the batches' chance levels.
    """
    n = len(image_emb)
    results = {"I2G": [], "G2I": []}
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        if drop_last and stop - start < batch_size:
            break
        size = stop - start
        if size < 2:
            continue
        img, gene = image_emb[start:stop], gene_emb[start:stop]
        results["I2G"].append(summarize_ranks(true_partner_ranks(img, gene, normalize=normalize), size, ks))
        results["G2I"].append(summarize_ranks(true_partner_ranks(gene, img, normalize=normalize), size, ks))
    out = {}
    for direction, rows in results.items():
        out[direction] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]} if rows else {}
        out[direction]["n_batches"] = len(rows)
    return out


def flatten(result: dict, prefix: str) -> dict[str, float]:
    """``{"I2G": {"R@5": x}}`` -> ``{f"{prefix}_i2g_R@5": x}`` (MLflow-friendly keys)."""
    flat = {}
    for direction, metrics in result.items():
        for key, value in metrics.items():
            flat[f"{prefix}_{direction.lower()}_{key.replace('@', '_at_')}"] = value
    return flat
