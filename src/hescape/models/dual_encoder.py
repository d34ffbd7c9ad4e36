"""The dual encoder: image tower + gene tower, each ending in a head to a shared embedding, and the
contrastive loss (which owns the learnable temperature).

A tower whose trunk is frozen and cached takes pre-computed features instead of raw input: the
module then holds only that tower's head, and its saved state has no trunk weights in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hescape.data.image_transforms import ImageNorm, to_model_input


@dataclass(frozen=True)
class TowerInputs:
    """What each tower receives: raw input for its trunk, or cached trunk features."""

    image_features: bool  # True: image tower input is cached trunk features
    gene_features: bool  # True: gene tower input is cached trunk features (frozen gene encoder)


class DualEncoder(nn.Module):
    """Image and gene towers plus the contrastive loss.

    ``forward`` returns ``(loss, image_embedding, gene_embedding)`` so that DDP sees every
    parameter (heads, trunks, logit scale/bias) used inside one forward call.
    """

    def __init__(self, *, image_head: nn.Module, gene_head: nn.Module, loss: nn.Module,
                 image_trunk: nn.Module | None = None, gene_trunk: nn.Module | None = None,
                 image_norm: ImageNorm | None = None, image_trunk_frozen: bool = False):
        super().__init__()
        self.image_trunk = image_trunk
        self.gene_trunk = gene_trunk
        self.image_head = image_head
        self.gene_head = gene_head
        self.loss = loss
        self.image_norm = image_norm
        self.image_trunk_frozen = image_trunk_frozen

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` patches (or cached features when there is no trunk) -> embedding."""
        if self.image_trunk is not None:
            x = to_model_input(x, self.image_norm)
            if self.image_trunk_frozen:
                with torch.no_grad():
                    x = self.image_trunk(x)
            else:
                x = self.image_trunk(x)
        return self.image_head(x.float())

    def encode_gene(self, x: torch.Tensor) -> torch.Tensor:
        """Transformed counts / tokens (or cached features when there is no trunk) -> embedding."""
        if self.gene_trunk is not None:
            x = self.gene_trunk(x)
        return self.gene_head(x.float())

    def forward(self, image_input: torch.Tensor, gene_input: torch.Tensor):
        img = self.encode_image(image_input)
        gene = self.encode_gene(gene_input)
        return self.loss(img, gene), img, gene

    def saved_state(self) -> dict[str, torch.Tensor]:
        """State to checkpoint: everything but a frozen image trunk (rebuilt from its weights)."""
        state = self.state_dict()
        if self.image_trunk_frozen:
            state = {k: v for k, v in state.items() if not k.startswith("image_trunk.")}
        return state

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        """Strict counterpart of :meth:`saved_state`: every expected key present, nothing extra."""
        expected = set(self.saved_state())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the model: missing {missing[:8]}, "
                               f"unexpected {unexpected[:8]}")
        full = self.state_dict()
        full.update(state)
        self.load_state_dict(full, strict=True)
