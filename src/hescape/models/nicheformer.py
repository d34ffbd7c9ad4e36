"""Nicheformer: a transformer over rank-ordered gene tokens, mean-pooled to one vector per spot.

The architecture follows the official model (theislab/nicheformer): a token embedding with the
padding token as ``padding_idx``, a learned positional embedding over the context, a post-norm
``nn.TransformerEncoder`` (ReLU, layer-norm eps 1e-12), batch first. Its input is
:func:`hescape.data.gene_transforms.nicheformer_tokens`.

Two ways to get one:

- :meth:`Nicheformer.from_scratch` for a panel: vocabulary id = gene index in the panel, vocabulary
  size = ``n_genes + n_special``; trained during alignment.
- :func:`load_nicheformer_checkpoint` for an official checkpoint: the user supplies a gene -> vocabulary
  id mapping file (and, ideally, the official technology-mean vector of the panel's technology).

Differences from the official ``get_embeddings``, on purpose: padding positions are excluded from the
mean (the official code averages over them too), and prefix (context) tokens are excluded like its
``with_context=False``.

Checkpoint key mapping (official Lightning ``state_dict`` -> this module): identical names for
``embeddings.weight``, ``positional_embedding.weight`` and ``encoder.layers.<i>.*``. Keys of parts
this encoder does not use are ignored and listed in :data:`IGNORED_PREFIXES`: the MLM
``classifier_head``, ``pooler_head``, ``cls_head`` and ``encoder_layer`` (the template layer the
official module keeps as an attribute; ``nn.TransformerEncoder`` deep-copies it into
``encoder.layers``). Any other extra or missing key, or a shape mismatch, fails with a
:class:`~hescape.errors.ConfigError` listing them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hescape.data.gene_transforms import NICHEFORMER_CONTEXT, NICHEFORMER_N_SPECIAL, NICHEFORMER_PAD
from hescape.errors import ConfigError
from hescape.io import atomic_file
from hescape.models.gene_encoders import GeneEncoder

log = logging.getLogger(__name__)

#: Official state-dict keys with these prefixes belong to heads this encoder does not use.
IGNORED_PREFIXES = ("classifier_head.", "pooler_head.", "cls_head.", "encoder_layer.")


class _SinusoidalPE(nn.Module):
    """Fixed sinusoidal positions (official ``learnable_pe=False``); no state-dict entries."""

    def __init__(self, d_model: int, context: int):
        super().__init__()
        pos = torch.arange(context, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        enc = torch.zeros(context, d_model)
        enc[:, 0::2] = torch.sin(pos * div)
        enc[:, 1::2] = torch.cos(pos * div)
        self.register_buffer("encoding", enc, persistent=False)

    def forward(self, length: int) -> torch.Tensor:
        return self.encoding[:length]


class Nicheformer(GeneEncoder):
    """Rank-token transformer gene encoder.

    Parameters
    ----------
    vocab_size
        Rows of the token embedding (special tokens included).
    d_model, n_heads, n_layers, dim_feedforward, dropout
        Transformer size (official model: 512, 16, 12, 1024, 0.0).
    context
        Maximum input length (tokens per spot, prefix tokens included).
    gene_token_ids
        Vocabulary id of each panel gene (``-1``: not in the vocabulary), used by the input transform.
    n_special, pad_token
        Offset of gene tokens and the padding token (official: 30 and 1).
    prefix_tokens
        Fixed tokens placed before the gene tokens (official checkpoints: species, assay, modality).
    learnable_pe
        Learned positional embedding (``True``) or fixed sinusoids.
    trim_padding
        Drop trailing columns that are padding in every row of a batch before the transformer. Padded
        keys are masked, so outputs are unchanged up to floating-point summation order; it saves most
        of the work on small panels.
    """

    input_kind = "tokens"

    def __init__(self, vocab_size: int, *, d_model: int = 512, n_heads: int = 16, n_layers: int = 12,
                 dim_feedforward: int = 1024, dropout: float = 0.0, context: int = NICHEFORMER_CONTEXT,
                 gene_token_ids: Sequence[int] | np.ndarray | None = None, n_special: int = NICHEFORMER_N_SPECIAL,
                 pad_token: int = NICHEFORMER_PAD, prefix_tokens: Sequence[int] = (), learnable_pe: bool = True,
                 layer_norm_eps: float = 1e-12, trim_padding: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        if len(prefix_tokens) >= context:
            raise ConfigError(f"context {context} leaves no room after {len(prefix_tokens)} prefix tokens")
        ids = np.arange(vocab_size - n_special) if gene_token_ids is None else np.asarray(gene_token_ids, np.int64)
        if ids.size and ids.max() + n_special >= vocab_size:
            raise ConfigError(f"gene token id {int(ids.max())} + {n_special} special tokens exceeds the "
                              f"vocabulary of {vocab_size}")
        self.config = {
            "vocab_size": vocab_size, "d_model": d_model, "n_heads": n_heads, "n_layers": n_layers,
            "dim_feedforward": dim_feedforward, "dropout": dropout, "context": context, "n_special": n_special,
            "pad_token": pad_token, "prefix_tokens": [int(t) for t in prefix_tokens], "learnable_pe": learnable_pe,
            "layer_norm_eps": layer_norm_eps,
        }
        self.gene_token_ids = ids
        self.technology_mean: np.ndarray | None = None  # set when an official mean vector is supplied
        self.trim_padding = trim_padding
        self.feature_dim = d_model
        self.embeddings = nn.Embedding(vocab_size, d_model, padding_idx=pad_token)
        if learnable_pe:
            self.positional_embedding = nn.Embedding(context, d_model)
        else:
            self.sinusoidal = _SinusoidalPE(d_model, context)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward, dropout, batch_first=True,
                                           layer_norm_eps=layer_norm_eps)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self._init_weights()

    @classmethod
    def from_scratch(cls, n_genes: int, *, d_model: int = 512, n_heads: int = 16, n_layers: int = 12,
                     dim_feedforward: int = 1024, dropout: float = 0.0, context: int | None = None,
                     n_special: int = NICHEFORMER_N_SPECIAL, trainable: bool = True, **kwargs: Any) -> Nicheformer:
        """A randomly initialised model whose vocabulary is the panel's genes (token = gene index +
        ``n_special``). ``context`` defaults to ``min(1500, n_genes)``: a spot never has more tokens
        than genes, so a longer context only adds padding."""
        context = min(NICHEFORMER_CONTEXT, n_genes) if context is None else context
        model = cls(n_genes + n_special, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                    dim_feedforward=dim_feedforward, dropout=dropout, context=context,
                    gene_token_ids=np.arange(n_genes), n_special=n_special, **kwargs)
        return model if trainable else model.freeze()

    def _init_weights(self) -> None:
        # As the official model: Xavier-normal linear weights, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def n_genes(self) -> int:
        return len(self.gene_token_ids)

    def transform_kwargs(self) -> dict[str, Any]:
        kw = {"gene_token_ids": self.gene_token_ids, "context": self.config["context"],
              "n_special": self.config["n_special"], "pad_token": self.config["pad_token"],
              "prefix_tokens": tuple(self.config["prefix_tokens"])}
        if self.technology_mean is not None:
            kw["technology_mean"] = self.technology_mean
        return kw

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` tokens (``L <= context``) -> ``(B, d_model)`` mean over non-padding gene tokens."""
        if tokens.dim() != 2:
            raise ValueError(f"expected (batch, length) tokens, got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config["context"]:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context of {self.config['context']}")
        tokens = tokens.long()
        pad = tokens == self.config["pad_token"]
        if self.trim_padding and tokens.shape[1] > 1:
            used = (~pad).any(0).nonzero()
            length = int(used.max()) + 1 if used.numel() else 1
            tokens, pad = tokens[:, :length], pad[:, :length]
        length = tokens.shape[1]
        pos = self.positional_embedding.weight[:length] if self.config["learnable_pe"] else self.sinusoidal(length)
        x = self.dropout(self.embeddings(tokens) + pos)
        # A spot with no expressed gene would have every key masked (NaN attention): let it attend to
        # its first position, so it gets a learned "empty spot" embedding instead.
        key_mask = pad.clone()
        empty = key_mask.all(1)
        key_mask[empty, 0] = False
        h = self.encoder(x, src_key_padding_mask=key_mask)
        keep = ~key_mask
        genes = keep.clone()
        genes[:, : len(self.config["prefix_tokens"])] = False
        # Pool over gene tokens; a spot without gene tokens falls back to its prefix/first position.
        weights = torch.where(genes.any(1, keepdim=True), genes, keep).to(h.dtype)
        return (h * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)

    def hyper_parameters(self) -> dict[str, Any]:
        """Hyper-parameters under the official names (plus this project's extras)."""
        c = self.config
        return {
            "dim_model": c["d_model"], "nheads": c["n_heads"], "dim_feedforward": c["dim_feedforward"],
            "nlayers": c["n_layers"], "dropout": c["dropout"], "batch_first": True,
            "context_length": c["context"], "learnable_pe": c["learnable_pe"],
            "n_special": c["n_special"], "pad_token": c["pad_token"], "layer_norm_eps": c["layer_norm_eps"],
        }


def save_nicheformer_checkpoint(model: Nicheformer, path: str | os.PathLike) -> None:
    """Write ``{"state_dict", "hyper_parameters"}`` in the official layout (loadable by
    :func:`load_nicheformer_checkpoint`), atomically."""
    obj = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
           "hyper_parameters": model.hyper_parameters()}
    with atomic_file(path, "wb") as fh:
        torch.save(obj, fh)


def read_gene_token_map(path: str | os.PathLike) -> dict[str, int]:
    """Read a gene -> vocabulary id mapping: JSON ``{"SYMBOL": id}`` or a TSV/CSV with columns
    ``symbol`` and ``token_id`` (or two unnamed columns). Ids are 0-based positions in the
    checkpoint's gene vocabulary, before the special-token offset."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read gene mapping {path}: {exc}") from exc
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object gene -> id")
        items = list(raw.items())
    else:
        sep = "\t" if "\t" in text.splitlines()[0] else ","
        rows = [ln.split(sep) for ln in text.splitlines() if ln.strip()]
        header = [c.strip().lower() for c in rows[0]]
        if "symbol" in header and "token_id" in header:
            i, j = header.index("symbol"), header.index("token_id")
            rows = rows[1:]
        else:
            i, j = 0, 1
        items = [(r[i].strip(), r[j].strip()) for r in rows]
    out: dict[str, int] = {}
    for line, (gene, tid) in enumerate(items):
        try:
            out[str(gene)] = int(tid)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: entry {line} ({gene!r}) has a non-integer id {tid!r}") from exc
        if out[str(gene)] < 0:
            raise ConfigError(f"{path}: entry {line} ({gene!r}) has a negative id")
    return out


def gene_token_ids_for(genes: Sequence[str], mapping: Mapping[str, int]) -> np.ndarray:
    """Vocabulary id of each panel gene; ``-1`` where the mapping has none (the gene is then never
    tokenised). Fails when no gene maps."""
    ids = np.array([mapping.get(g, -1) for g in genes], dtype=np.int64)
    missing = int((ids < 0).sum())
    if missing == len(ids):
        raise ConfigError("none of the panel's genes is in the Nicheformer gene mapping")
    if missing:
        log.warning("%d of %d panel genes are not in the Nicheformer vocabulary and are skipped", missing, len(ids))
    return ids


def load_nicheformer_checkpoint(path: str | os.PathLike, *, genes: Sequence[str] | None = None,
                                gene_map: str | os.PathLike | Mapping[str, int] | None = None,
                                technology_mean: str | os.PathLike | np.ndarray | None = None,
                                n_heads: int | None = None, prefix_tokens: Sequence[int] = (),
                                n_special: int | None = None, pad_token: int | None = None,
                                dropout: float = 0.0, strip_prefix: str = "", trainable: bool = False,
                                trim_padding: bool = True) -> Nicheformer:
    """Load a Nicheformer checkpoint (official Lightning ``.ckpt`` or one written by
    :func:`save_nicheformer_checkpoint`) strictly, with ``weights_only=True``.

    Parameters
    ----------
    path
        The checkpoint: ``{"state_dict": ..., "hyper_parameters": ...}`` or a bare state dict.
    genes, gene_map
        The panel's gene symbols and a gene -> vocabulary id mapping (file or dict). Without them
        the vocabulary is taken to be the panel's genes in order (a checkpoint trained here).
    technology_mean
        Technology-mean vector over the checkpoint's vocabulary (``.npy`` file or array), reordered
        to the panel's genes; without it the panel's training-split mean is used.
    n_heads
        Attention heads when the checkpoint has no ``hyper_parameters`` (heads cannot be inferred
        from weights).
    prefix_tokens
        Tokens prepended to every spot (official: species, assay and modality tokens).
    strip_prefix
        Prefix removed from every key first (e.g. ``"backbone."`` of a fine-tuning wrapper).
    trainable
        Fine-tune the loaded weights (default: frozen, as in every published sweep).
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"Nicheformer checkpoint {path} does not exist") from exc
    except Exception as exc:  # unpickling errors of non-tensor payloads, corrupt files
        raise ConfigError(f"cannot load Nicheformer checkpoint {path} with weights_only=True: {exc}. "
                          "Re-save it as {'state_dict': ..., 'hyper_parameters': {...}} of plain types.") from exc
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(obj).__name__}")
    state = obj.get("state_dict", obj)
    hp = dict(obj.get("hyper_parameters") or {})
    state = {k[len(strip_prefix):] if strip_prefix and k.startswith(strip_prefix) else k: v
             for k, v in state.items() if isinstance(v, torch.Tensor)}
    ignored = sorted(k for k in state if k.startswith(IGNORED_PREFIXES))
    state = {k: v for k, v in state.items() if k not in set(ignored)}
    if "embeddings.weight" not in state:
        raise ConfigError(f"{path}: no 'embeddings.weight'; keys found: {sorted(state)[:20]}")
    vocab_size, d_model = state["embeddings.weight"].shape
    layer_ids = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    n_layers = int(hp.get("nlayers", max(layer_ids) + 1 if layer_ids else 0))
    ff_key = "encoder.layers.0.linear1.weight"
    dim_feedforward = int(hp.get("dim_feedforward", state[ff_key].shape[0] if ff_key in state else 0))
    heads = n_heads if n_heads is not None else hp.get("nheads")
    if heads is None:
        raise ConfigError(f"{path} has no hyper_parameters; pass n_heads (it cannot be inferred from weights)")
    learnable_pe = bool(hp.get("learnable_pe", "positional_embedding.weight" in state))
    context = int(hp.get("context_length", state["positional_embedding.weight"].shape[0]
                         if "positional_embedding.weight" in state else NICHEFORMER_CONTEXT))
    n_special = int(hp.get("n_special", NICHEFORMER_N_SPECIAL) if n_special is None else n_special)
    pad_token = int(hp.get("pad_token", NICHEFORMER_PAD) if pad_token is None else pad_token)

    if gene_map is not None:
        if genes is None:
            raise ConfigError("gene_map needs genes= (the panel's gene symbols in gexp order)")
        mapping = gene_map if isinstance(gene_map, Mapping) else read_gene_token_map(gene_map)
        ids = gene_token_ids_for(genes, mapping)
    else:
        n = len(genes) if genes is not None else vocab_size - n_special
        ids = np.arange(n)
    model = Nicheformer(int(vocab_size), d_model=int(d_model), n_heads=int(heads), n_layers=n_layers,
                        dim_feedforward=dim_feedforward, dropout=dropout, context=context, gene_token_ids=ids,
                        n_special=n_special, pad_token=pad_token, prefix_tokens=prefix_tokens,
                        learnable_pe=learnable_pe, layer_norm_eps=float(hp.get("layer_norm_eps", 1e-12)),
                        trim_padding=trim_padding)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if wrong:
            parts.append("shape mismatches " + ", ".join(
                f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong))
        raise ConfigError(f"Nicheformer checkpoint {path} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    if ignored:
        log.info("Nicheformer checkpoint %s: ignored %d keys of unused heads", path, len(ignored))

    if technology_mean is not None:
        tm = np.load(technology_mean, allow_pickle=False) if isinstance(technology_mean, (str, os.PathLike)) \
            else np.asarray(technology_mean)
        tm = np.asarray(tm, dtype=np.float64).reshape(-1)
        if tm.shape[0] < int(ids.max()) + 1:
            raise ConfigError(f"technology mean has {tm.shape[0]} values; the gene mapping uses id {int(ids.max())}")
        # Genes outside the vocabulary are never tokenised; their mean only needs to be valid.
        model.technology_mean = np.where(ids >= 0, tm[np.clip(ids, 0, None)], 1.0)
    return model if trainable else model.freeze()
