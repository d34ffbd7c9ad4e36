"""Projection heads from a trunk's feature to the shared embedding (128-d in HESCAPE).

``linear`` and ``mlp`` follow PROTOCOL.md section 2. ``transformer`` attends over the tokens *of
each sample* (``batch_first=True``); the reference implementation fed a (B, D) batch to a
sequence-first encoder, so it attended across the samples of the batch and a sample's embedding
depended on its batch mates. Here a sample's output never depends on other samples.

Every factory takes ``(dim_in, dim_out=128, **kw)``; ``hidden`` and ``dropout`` are accepted by all
heads so one tuner configuration serves every head (the linear head has neither and ignores them).
"""

from __future__ import annotations

import torch
from torch import nn

from hescape.errors import ConfigError
from hescape.registry import Registry

HEADS: Registry = Registry("head")
EMBED_DIM = 128


def create_head(name: str, dim_in: int, dim_out: int = EMBED_DIM, **kw) -> nn.Module:
    """Build head ``name`` mapping ``dim_in`` features to ``dim_out``; unknown names list the known ones."""
    factory = HEADS.get(name)
    try:
        return factory(int(dim_in), int(dim_out), **kw)
    except TypeError as exc:  # unknown keyword for this head
        raise ConfigError(f"head {name!r}: {exc}") from exc


@HEADS.register("linear")
def linear_head(dim_in: int, dim_out: int = EMBED_DIM, *, hidden: int | None = None,
                dropout: float | None = None) -> nn.Module:
    """``Linear(dim_in, dim_out)`` (``hidden`` / ``dropout`` are accepted and unused)."""
    return nn.Linear(dim_in, dim_out)


class MLPHead(nn.Sequential):
    """Linear(d, hidden), GELU, Dropout, LayerNorm(hidden), Linear(hidden, out), Dropout (PROTOCOL: 256, 0.2)."""

    def __init__(self, dim_in: int, dim_out: int = EMBED_DIM, hidden: int = 256, dropout: float = 0.2):
        if hidden is None:
            hidden = 256
        if dropout is None:
            dropout = 0.2
        super().__init__(
            nn.Linear(dim_in, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.LayerNorm(hidden),
            nn.Linear(hidden, dim_out),
            nn.Dropout(dropout),
        )


@HEADS.register("mlp")
def mlp_head(dim_in: int, dim_out: int = EMBED_DIM, *, hidden: int | None = 256,
             dropout: float | None = 0.2) -> nn.Module:
    """The protocol's MLP head (hidden width and dropout tunable)."""
    return MLPHead(dim_in, dim_out, hidden=hidden, dropout=dropout)


class TransformerHead(nn.Module):
    """A small transformer over the tokens of each sample, read out through a learned [CLS] token.

    Parameters
    ----------
    dim_in
        Feature size of the input (vector size, or token size with ``input="tokens"``).
    dim_out
        Embedding size.
    input
        ``"vector"``: input (B, dim_in) is projected to ``n_tokens`` tokens of width ``hidden``
        (with learned position embeddings), so attention has something to attend over;
        ``"tokens"``: input (B, T, dim_in), e.g. :meth:`ImageEncoder.forward_tokens`, each token
        projected to ``hidden`` (trunk tokens already carry their positions).
    n_tokens
        Tokens a vector is split into (``input="vector"`` only).
    hidden
        Transformer width (``d_model``).
    heads, layers
        Attention heads and encoder layers.
    dropout
        Dropout inside the transformer layers.

    Notes
    -----
    ``batch_first=True`` throughout: attention runs over dimension 1 (tokens of one sample), never
    over the batch.
    """

    def __init__(self, dim_in: int, dim_out: int = EMBED_DIM, *, input: str = "vector", n_tokens: int = 4,
                 hidden: int = 256, heads: int = 4, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        if input not in ("vector", "tokens"):
            raise ConfigError(f"transformer head: input must be 'vector' or 'tokens', got {input!r}")
        if hidden % heads:
            raise ConfigError(f"transformer head: hidden {hidden} is not divisible by heads {heads}")
        self.input, self.n_tokens, self.hidden = input, int(n_tokens), int(hidden)
        if input == "vector":
            self.proj_in = nn.Linear(dim_in, self.n_tokens * hidden)
            self.pos = nn.Parameter(torch.zeros(1, self.n_tokens, hidden))
            nn.init.trunc_normal_(self.pos, std=0.02)
        else:
            self.proj_in = nn.Linear(dim_in, hidden)
            self.register_parameter("pos", None)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        nn.init.trunc_normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        # enable_nested_tensor only applies to post-norm layers; off avoids a warning and a fast path
        # whose numerics differ between batch sizes.
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input == "vector":
            if x.dim() != 2:
                raise ValueError(f"transformer head built for vectors (B, D) got shape {tuple(x.shape)}; "
                                 "build it with input='tokens' for (B, T, D)")
            tokens = self.proj_in(x).view(x.shape[0], self.n_tokens, self.hidden) + self.pos
        else:
            if x.dim() != 3:
                raise ValueError(f"transformer head built for tokens (B, T, D) got shape {tuple(x.shape)}")
            tokens = self.proj_in(x)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.encoder(tokens)
        return self.out(self.norm(tokens[:, 0]))


@HEADS.register("transformer")
def transformer_head(dim_in: int, dim_out: int = EMBED_DIM, *, hidden: int | None = 256,
                     dropout: float | None = 0.1, **kw) -> nn.Module:
    """:class:`TransformerHead` (``input``, ``n_tokens``, ``heads``, ``layers`` as keywords)."""
    return TransformerHead(dim_in, dim_out, hidden=256 if hidden is None else hidden,
                           dropout=0.1 if dropout is None else dropout, **kw)
