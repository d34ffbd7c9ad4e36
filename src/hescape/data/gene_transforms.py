"""Gene-expression transforms: raw counts in, encoder input out, one spot at a time.

Every transform here is a function of one spot's counts and of statistics fitted ONCE on the
training split (:class:`GeneStats`). A spot's input therefore never depends on which other spots
share its mini-batch (the reference code normalised by the batch median: defect 7 of PROTOCOL.md),
and validation/test spots never influence any statistic.

Each transform accepts a numpy array or a torch tensor of raw counts ``(n_spots, n_genes)`` (or one
spot ``(n_genes,)``) and returns the same kind of object.

=====================  ====================================================  ==================
input kind             transform                                             gene encoders
=====================  ====================================================  ==================
``log1p_norm``         :func:`library_size_log1p` (target = train median)    ``mlp``
``log1p``              :func:`log1p`                                         ``drvi``
``tokens``             :func:`nicheformer_tokens`                            ``nicheformer``
=====================  ====================================================  ==================
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hescape.errors import ConfigError, DataError
from hescape.io import write_json
from hescape.registry import Registry

#: Total counts every spot is scaled to before Nicheformer's technology-mean division.
NICHEFORMER_TARGET_SUM = 10_000.0
#: Token ids below this are reserved (Nicheformer reserves 30 "auxiliary" tokens).
NICHEFORMER_N_SPECIAL = 30
#: Nicheformer's padding token (the official data use 0 and the model maps it to 1, its padding_idx).
NICHEFORMER_PAD = 1
#: Default context length of the official model.
NICHEFORMER_CONTEXT = 1500

_CHUNK = 16_384  # rows per chunk when fitting statistics, to bound float64 temporaries

GENE_STATS_VERSION = 1


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _spot_totals(counts):
    """Per-spot total counts, exact: integer counts are summed in float64 (exact below 2**53)."""
    if _is_torch(counts):
        import torch

        return counts.to(torch.float64).sum(-1, keepdim=True)
    return np.asarray(counts, dtype=np.float64).sum(-1, keepdims=True)


#  Train-only statistics


@dataclass
class GeneStats:
    """Statistics of the TRAINING split that the per-spot transforms need.

    Attributes
    ----------
    n_genes
        Number of genes (columns) the statistics were fitted on.
    n_spots
        Training spots used (spots with zero total counts are skipped: they carry no information).
    median_total
        Median total counts per training spot: the fixed ``target_sum`` of
        :func:`library_size_log1p` (the paper's "median spot total", computed once, not per batch).
    technology_mean
        Per-gene mean over training spots of the expression scaled to 10,000 counts per spot:
        Nicheformer's "technology mean" for this panel.
    panel_hash
        Content hash of the panel the statistics belong to (``None`` when unknown).
    """

    n_genes: int
    n_spots: int
    median_total: float
    technology_mean: list[float]
    panel_hash: str | None = None
    version: int = GENE_STATS_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> GeneStats:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(obj) - known)
        if unknown:
            raise DataError(f"unknown gene-stats keys {unknown}", field="gene_stats")
        stats = cls(**obj)
        if len(stats.technology_mean) != stats.n_genes:
            raise DataError(f"technology_mean has {len(stats.technology_mean)} values for {stats.n_genes} genes",
                            field="gene_stats")
        return stats

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> GeneStats:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read gene statistics: {exc}", file=path) from exc


def fit_gene_stats(train_counts, *, panel_hash: str | None = None) -> GeneStats:
    """Fit :class:`GeneStats` on the raw counts of the TRAINING spots only.

    Parameters
    ----------
    train_counts
        ``(n_spots, n_genes)`` raw counts of training spots (array, memory map or tensor).
    panel_hash
        Recorded with the statistics so that a mismatch with another panel can be detected.
    """
    if _is_torch(train_counts):
        train_counts = train_counts.detach().cpu().numpy()
    counts = np.asarray(train_counts)  # a memory map stays a view; blocks are read below
    if counts.ndim != 2:
        raise DataError(f"train counts must be 2-D (spots, genes), got shape {counts.shape}")
    n, g = counts.shape
    totals = np.empty(n, dtype=np.float64)
    sums = np.zeros(g, dtype=np.float64)
    for start in range(0, n, _CHUNK):
        block = np.asarray(counts[start:start + _CHUNK], dtype=np.float64)
        if (block < 0).any():
            raise DataError("negative counts in the training split (raw counts expected)")
        tot = block.sum(1)
        totals[start:start + len(block)] = tot
        keep = tot > 0
        sums += (block[keep] * (NICHEFORMER_TARGET_SUM / tot[keep, None])).sum(0)
    nonempty = totals > 0
    n_used = int(nonempty.sum())
    if n_used == 0:
        raise DataError("every training spot has zero counts; cannot fit gene statistics")
    return GeneStats(
        n_genes=int(g),
        n_spots=n_used,
        median_total=float(np.median(totals[nonempty])),
        technology_mean=(sums / n_used).tolist(),
        panel_hash=panel_hash,
    )


#  Per-spot transforms


def library_size_log1p(counts, target_sum: float):
    """``log1p(counts / spot_total * target_sum)`` for each spot.

    ``target_sum`` is a fixed statistic (:attr:`GeneStats.median_total` of the training split), so the
    result for a spot does not depend on the other spots of its batch. Spots with no counts map to zeros.
    Returns float32.
    """
    if not target_sum > 0:
        raise ConfigError(f"target_sum must be positive, got {target_sum}")
    totals = _spot_totals(counts)
    if _is_torch(counts):
        import torch

        scale = target_sum / torch.where(totals > 0, totals, torch.ones_like(totals))
        return torch.log1p(counts.to(torch.float64) * scale).to(torch.float32)
    scale = target_sum / np.where(totals > 0, totals, 1.0)
    return np.log1p(np.asarray(counts, dtype=np.float64) * scale).astype(np.float32)


def log1p(counts):
    """``log1p(counts)`` of the raw counts (DRVI's encoder input for count likelihoods); float32."""
    if _is_torch(counts):
        import torch

        return torch.log1p(counts.to(torch.float32))
    return np.log1p(np.asarray(counts, dtype=np.float32))


def nicheformer_tokens(counts, gene_token_ids, technology_mean, *, context: int = NICHEFORMER_CONTEXT,
                       n_special: int = NICHEFORMER_N_SPECIAL, pad_token: int = NICHEFORMER_PAD,
                       prefix_tokens: Sequence[int] = ()):
    """Nicheformer's rank tokens of each spot.

    For each spot: scale to 10,000 total counts, divide each gene by its technology mean (a mean of 0
    is replaced by 1, as the official pipeline does), keep ONLY genes with non-zero counts, order them
    by decreasing value (ties broken by increasing gene index, so the result is deterministic), map
    each gene to ``vocabulary id + n_special``, prepend ``prefix_tokens`` (e.g. the official model's
    species/assay/modality tokens), truncate to ``context`` and pad with ``pad_token``.

    Parameters
    ----------
    counts
        ``(n_spots, n_genes)`` or ``(n_genes,)`` raw counts (numpy or torch).
    gene_token_ids
        ``(n_genes,)`` vocabulary id of each panel gene (``arange(n_genes)`` for a model trained from
        scratch on this panel); ``-1`` for a gene outside the vocabulary, which is then never emitted.
    technology_mean
        ``(n_genes,)`` :attr:`GeneStats.technology_mean` (or an official technology-mean vector
        reordered to the panel's genes).
    context
        Output length (including the prefix tokens).
    n_special
        Offset of gene tokens: ids below it are special tokens.
    pad_token
        Token written after the last gene token.
    prefix_tokens
        Fixed tokens placed before the gene tokens of every spot.

    Returns
    -------
    ``(n_spots, context)`` int64 tokens (numpy or torch, like ``counts``).
    """
    torch_in = _is_torch(counts)
    if torch_in:
        import torch

        device = counts.device
        x = counts.detach().to("cpu", torch.float64).numpy()
    else:
        x = np.asarray(counts, dtype=np.float64)
    single = x.ndim == 1
    x = np.atleast_2d(x)
    ids = np.asarray(gene_token_ids, dtype=np.int64).reshape(-1)
    mean = np.asarray(technology_mean, dtype=np.float64).reshape(-1)
    if ids.shape[0] != x.shape[1] or mean.shape[0] != x.shape[1]:
        raise ConfigError(f"counts have {x.shape[1]} genes but gene_token_ids has {ids.shape[0]} and "
                          f"technology_mean {mean.shape[0]}")
    prefix = np.asarray(list(prefix_tokens), dtype=np.int64)
    n_gene_slots = context - prefix.size
    if n_gene_slots < 1:
        raise ConfigError(f"context {context} leaves no room after {prefix.size} prefix tokens")

    totals = x.sum(1, keepdims=True)
    values = x * (NICHEFORMER_TARGET_SUM / np.where(totals > 0, totals, 1.0))
    values /= np.where(mean == 0, 1.0, mean)
    # Only expressed genes inside the vocabulary are ranked; the rest sort to the end as -1 and
    # become padding.
    present = (x > 0) & (ids >= 0)[None, :]
    values = np.where(present, values, -1.0)
    # A stable sort of the negated values orders by decreasing value and keeps equal values in
    # increasing gene index: deterministic ties, independent of the other rows of the batch.
    order = np.argsort(-values, axis=1, kind="stable")[:, :n_gene_slots]
    n_present = present.sum(1, keepdims=True)
    tokens = ids[order] + n_special
    tokens = np.where(np.arange(order.shape[1])[None, :] < n_present, tokens, pad_token)
    if tokens.shape[1] < n_gene_slots:  # panels with fewer genes than the context
        tokens = np.pad(tokens, ((0, 0), (0, n_gene_slots - tokens.shape[1])), constant_values=pad_token)
    if prefix.size:
        tokens = np.concatenate([np.broadcast_to(prefix, (len(tokens), prefix.size)), tokens], axis=1)
    tokens = tokens.astype(np.int64)
    if single:
        tokens = tokens[0]
    if torch_in:
        return torch.from_numpy(np.ascontiguousarray(tokens)).to(device)
    return tokens


#  Registry: input kind -> transform factory


GENE_TRANSFORMS: Registry[Callable[..., Callable]] = Registry("gene transform")


@GENE_TRANSFORMS.register("log1p_norm")
def _make_library_size_log1p(stats: GeneStats, **_: Any) -> Callable:
    return partial(library_size_log1p, target_sum=stats.median_total)


@GENE_TRANSFORMS.register("log1p")
def _make_log1p(stats: GeneStats | None = None, **_: Any) -> Callable:
    return log1p


@GENE_TRANSFORMS.register("tokens")
def _make_nicheformer_tokens(stats: GeneStats, *, gene_token_ids=None, technology_mean=None,
                             context: int = NICHEFORMER_CONTEXT, n_special: int = NICHEFORMER_N_SPECIAL,
                             pad_token: int = NICHEFORMER_PAD, prefix_tokens: Sequence[int] = ()) -> Callable:
    ids = np.arange(stats.n_genes) if gene_token_ids is None else np.asarray(gene_token_ids, dtype=np.int64)
    mean = stats.technology_mean if technology_mean is None else technology_mean
    return partial(nicheformer_tokens, gene_token_ids=ids, technology_mean=np.asarray(mean, dtype=np.float64),
                   context=context, n_special=n_special, pad_token=pad_token, prefix_tokens=tuple(prefix_tokens))


def transform_for(encoder_or_kind, stats: GeneStats | None, **overrides: Any) -> Callable:
    """The per-spot transform (raw counts -> encoder input) that a gene encoder needs.

    Parameters
    ----------
    encoder_or_kind
        A gene encoder (anything with ``input_kind`` and optionally ``transform_kwargs()``, e.g.
        :class:`hescape.models.gene_encoders.GeneEncoder`) or an input kind name.
    stats
        Training-split statistics (:func:`fit_gene_stats`); may be ``None`` for ``log1p``.
    overrides
        Keyword arguments that replace the encoder's own transform arguments.
    """
    if isinstance(encoder_or_kind, str):
        kind, kwargs = encoder_or_kind, {}
    else:
        kind = encoder_or_kind.input_kind
        get = getattr(encoder_or_kind, "transform_kwargs", None)
        kwargs = dict(get()) if callable(get) else {}
    kwargs.update(overrides)
    factory = GENE_TRANSFORMS.get(kind)
    if stats is None and kind != "log1p":
        raise ConfigError(f"gene transform {kind!r} needs training-split statistics (fit_gene_stats)")
    if stats is not None and kind == "tokens" and kwargs.get("gene_token_ids") is not None \
            and len(kwargs["gene_token_ids"]) != stats.n_genes:
        raise ConfigError(f"encoder expects {len(kwargs['gene_token_ids'])} genes, statistics have {stats.n_genes}")
    return factory(stats, **kwargs)
