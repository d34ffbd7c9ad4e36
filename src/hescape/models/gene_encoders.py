"""Gene encoders by name: raw expression of one spot -> a feature vector.

Every encoder is a :class:`GeneEncoder` with

- ``feature_dim``: size of its output (a head maps it to the shared 128-d space),
- ``input_kind``: which per-spot transform of the raw counts it expects (``log1p_norm``, ``log1p`` or
  ``tokens``; :func:`hescape.data.gene_transforms.transform_for` returns that transform),
- ``trainable``: whether its weights are optimised during alignment. A frozen encoder stays in eval
  mode whatever ``train()`` is called with, so dropout and normalisation statistics never drift
  (defect 5 of PROTOCOL.md).

==============  ==============================================================================
``mlp``         the paper's MLP: Linear(G, 128), 3 x [BatchNorm, ReLU, Dropout 0.1, Linear(128, 128)],
                BatchNorm, ReLU; input normalised per spot to the TRAINING median total, then log1p
``drvi``        frozen posterior mean of a DRVI model pretrained on the training split
                (:mod:`hescape.models.drvi_encoder`); input log1p(counts)
``nicheformer`` rank-token transformer (:mod:`hescape.models.nicheformer`), trained from scratch or
                loaded from an official checkpoint; input rank tokens
==============  ==============================================================================

:func:`frozen_gene_features` computes a frozen encoder's features once per panel through the feature
cache, so alignment never runs a frozen gene trunk again.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hescape.errors import ConfigError
from hescape.registry import Registry

INPUT_KINDS = ("log1p_norm", "log1p", "tokens")

GENE_ENCODERS: Registry = Registry("gene encoder")


class GeneEncoder(nn.Module):
    """Base class of gene encoders: ``forward(x) -> (batch, feature_dim)``.

    Attributes
    ----------
    feature_dim
        Output size.
    input_kind
        One of :data:`INPUT_KINDS`: the per-spot transform of raw counts this encoder reads.
    trainable
        ``False`` for frozen encoders: parameters without gradients, always in eval mode.
    """

    feature_dim: int
    input_kind: str
    trainable: bool = True

    def transform_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the encoder's input transform (e.g. Nicheformer's vocabulary)."""
        return {}

    def freeze(self) -> GeneEncoder:
        """Make the encoder frozen: no gradients, eval mode from now on."""
        self.trainable = False
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> GeneEncoder:
        # A frozen encoder must never leave eval mode: dropout would be active and normalisation
        # statistics would drift while "frozen" (the reference code's defect 5).
        return super().train(mode and self.trainable)


class MlpGeneEncoder(GeneEncoder):
    """The paper's MLP gene encoder (``generic`` in the reference code).

    ``Linear(G, hidden)`` then ``n_blocks`` x [BatchNorm, ReLU, Dropout, Linear(hidden, hidden)], then
    BatchNorm, ReLU. Its input is :func:`~hescape.data.gene_transforms.library_size_log1p` with the
    training median total, so each spot is normalised on its own (BatchNorm inside the network is an
    ordinary layer with running statistics in eval mode).
    """

    input_kind = "log1p_norm"

    def __init__(self, n_genes: int, *, hidden: int = 128, n_blocks: int = 3, dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(n_genes, hidden)]
        for _ in range(n_blocks):
            layers += [nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)]
        layers += [nn.BatchNorm1d(hidden), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.n_genes = n_genes
        self.feature_dim = hidden

    def forward(self, x):
        return self.net(x)


@GENE_ENCODERS.register("mlp")
def _mlp(n_genes: int, *, hidden: int = 128, n_blocks: int = 3, dropout: float = 0.1,
         trainable: bool = True) -> GeneEncoder:
    enc = MlpGeneEncoder(n_genes, hidden=hidden, n_blocks=n_blocks, dropout=dropout)
    return enc if trainable else enc.freeze()


@GENE_ENCODERS.register("drvi")
def _drvi(n_genes: int, *, path=None, panel=None, cache_dir=None, panel_hash: str | None = None,
          **drvi_params: Any) -> GeneEncoder:
    """A frozen DRVI encoder: from a pretrained cache entry (``path``), or pretrained now on the
    training split of ``panel`` (cached under ``cache_dir``). ``panel_hash``, when given, must be the
    hash of the panel the model was trained on."""
    from hescape.models.drvi_encoder import DrviEncoder, pretrain_drvi

    if path is None:
        if panel is None or cache_dir is None:
            raise ConfigError("gene encoder 'drvi' needs path= (a pretrained DRVI cache entry) "
                              "or panel= and cache_dir= to pretrain one")
        path = pretrain_drvi(panel, cache_dir, **drvi_params)
    elif drvi_params:
        raise ConfigError(f"gene encoder 'drvi' with path= takes no DRVI parameters; got {sorted(drvi_params)}")
    enc = DrviEncoder.load(path)
    if enc.n_genes != n_genes:
        raise ConfigError(f"DRVI encoder at {path} was trained on {enc.n_genes} genes, the panel has {n_genes}")
    if panel_hash is not None and enc.info.get("panel_hash") != panel_hash:
        raise ConfigError(f"DRVI encoder at {path} belongs to panel {enc.info.get('panel_hash')}, not {panel_hash}")
    return enc


@GENE_ENCODERS.register("nicheformer")
def _nicheformer(n_genes: int, *, checkpoint=None, **kwargs: Any) -> GeneEncoder:
    """A Nicheformer encoder: from scratch over the panel's genes, or an official ``checkpoint``
    (see :func:`hescape.models.nicheformer.load_nicheformer_checkpoint` for its arguments)."""
    from hescape.models.nicheformer import Nicheformer, load_nicheformer_checkpoint

    if checkpoint is not None:
        enc = load_nicheformer_checkpoint(checkpoint, **kwargs)
        if len(enc.gene_token_ids) != n_genes:
            raise ConfigError(f"Nicheformer gene mapping covers {len(enc.gene_token_ids)} genes, "
                              f"the panel has {n_genes}")
        return enc
    return Nicheformer.from_scratch(n_genes, **kwargs)


def create_gene_encoder(name: str, n_genes: int, **kwargs: Any) -> GeneEncoder:
    """Create the gene encoder registered as ``name`` for a panel of ``n_genes`` genes.

    Unknown names raise :class:`~hescape.errors.UnknownNameError` listing the known ones.
    """
    enc = GENE_ENCODERS.create(name, n_genes, **kwargs)
    if enc.input_kind not in INPUT_KINDS:  # a registered factory returned something inconsistent
        raise ConfigError(f"gene encoder {name!r} has unknown input kind {enc.input_kind!r}")
    return enc


def gene_encoder_names() -> list[str]:
    return GENE_ENCODERS.names()


FEATURE_VERSION = 1


def frozen_gene_features(name: str, *, shards, panel_dir, cache_dir, seed: int = 0, progress: bool = True,
                         batch_size: int = 1024, device: str | None = None,
                         **kwargs: Any) -> dict[str, str] | None:
    """Features of a FROZEN gene encoder for every split of ``shards``, computed once through the
    feature cache (:class:`hescape.data.feature_cache.FeatureCache`); ``None`` when the encoder is
    trainable (its inputs are then transformed per batch by the training loop).

    ``drvi`` is pretrained (or reused) on the TRAINING split of the curated panel at ``panel_dir``
    (only the training samples' files are read), cached under ``<cache_dir>/drvi``; ``kwargs`` are its
    :class:`~hescape.models.drvi_encoder.DrviParams` overrides or ``path=`` of a cache entry. ``seed``
    (the alignment seed) is deliberately not DRVI's seed: one DRVI model per panel serves every
    alignment seed.

    Returns
    -------
    ``split -> path of a float32 (n_spots, feature_dim) .npy`` or ``None``.
    """
    import hashlib
    import json
    from pathlib import Path

    import numpy as np
    import torch

    from hescape.data.feature_cache import FeatureCache
    from hescape.data.gene_transforms import transform_for
    from hescape.io import sha256_file

    del seed  # see the docstring
    n_genes = len(shards.genes)
    description: dict[str, Any] = {"kind": "gene", "version": FEATURE_VERSION, "panel_hash": shards.panel_hash,
                                   "encoder": name}
    if name == "drvi":
        from hescape.models.drvi_encoder import pretrain_drvi

        path = kwargs.pop("path", None)
        if path is None:
            from hescape.data.panel import read_panel

            panel = read_panel(panel_dir, images=False, splits=["train"])
            if panel.meta.content_hash != shards.panel_hash:
                raise ConfigError(f"panel {panel_dir} (hash {panel.meta.content_hash}) is not the panel of the "
                                  f"shards ({shards.panel_hash})")
            path = pretrain_drvi(panel, Path(cache_dir) / "drvi", progress=progress, **kwargs)
        elif kwargs:
            raise ConfigError(f"gene encoder 'drvi' with path= takes no DRVI parameters; got {sorted(kwargs)}")
        encoder = create_gene_encoder("drvi", n_genes, path=path, panel_hash=shards.panel_hash)
        description["drvi"] = Path(path).name  # panel hash + DRVI parameter hash
    else:
        if name == "nicheformer" and kwargs.get("gene_map") is not None:
            kwargs.setdefault("genes", list(shards.genes))
        encoder = create_gene_encoder(name, n_genes, **kwargs)
        if encoder.trainable:
            return None
        description["encoder_kwargs"] = json.loads(json.dumps(kwargs, sort_keys=True, default=str))
        checkpoint = kwargs.get("checkpoint")
        if checkpoint is not None:
            description["checkpoint_sha256"] = sha256_file(checkpoint)
    description["feature_dim"] = encoder.feature_dim
    description["stats"] = hashlib.sha256(json.dumps(shards.gene_stats().to_json(), sort_keys=True).encode()
                                          ).hexdigest()[:16]
    transform = transform_for(encoder, shards.gene_stats())
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = encoder.to(device).eval()
    sizes, aliases = shards.manifest.get("sizes", {}), shards.manifest.get("split_aliases", {})
    splits = [s for s in ("train", "val", "test") if s in sizes or s in aliases]

    def compute(split: str) -> np.ndarray:
        counts = shards.split(split).counts
        out = []
        with torch.inference_mode():
            for start in range(0, len(counts), batch_size):
                x = transform(torch.from_numpy(np.ascontiguousarray(counts[start:start + batch_size])))
                out.append(encoder(x.to(device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, encoder.feature_dim), np.float32)

    paths = FeatureCache(cache_dir).get_or_compute(description, splits, compute)
    return {s: str(p) for s, p in paths.items()}
