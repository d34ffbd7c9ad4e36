"""Loading trained checkpoints back into models, and embedding whole splits with them.

A checkpoint directory holds ``model.pt`` (weights only: everything but a frozen image trunk,
which is rebuilt from its pretrained weights), ``train_state.pt`` (optimizer, scheduler, epoch)
and ``checkpoint.json`` (epoch, metrics, resolved train config, model spec, shard and feature
cache locations). Loading is ``weights_only=True`` with exact key matching.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hescape.config import from_dict
from hescape.errors import DataError
from hescape.train.config import TrainConfig
from hescape.train.loop import INFO_FILE, MODEL_FILE, build_model


@dataclass
class TrainedModel:
    model: torch.nn.Module
    cfg: TrainConfig
    info: dict

    @property
    def spec(self) -> dict:
        return self.info["spec"]


def load_trained(checkpoint_dir: str | Path, *, device: str = "cpu") -> TrainedModel:
    """Rebuild the model of a checkpoint and load its weights strictly."""
    checkpoint_dir = Path(checkpoint_dir)
    info_path = checkpoint_dir / INFO_FILE
    if not info_path.exists():
        raise DataError("not a training checkpoint (no checkpoint.json)", file=checkpoint_dir)
    info = json.loads(info_path.read_text())
    cfg = from_dict(TrainConfig, info["train"])
    model = build_model(cfg, info["spec"])
    state = torch.load(checkpoint_dir / MODEL_FILE, map_location=device, weights_only=True)
    model.load_saved_state(state)
    return TrainedModel(model=model.to(device).eval(), cfg=cfg, info=info)


@dataclass
class SplitEmbeddings:
    """Aligned embeddings of a split, and the trunk features they were computed from."""

    image: np.ndarray
    gene: np.ndarray
    image_trunk: np.ndarray | None
    gene_trunk: np.ndarray | None


def _rows(x, start, stop):
    return torch.from_numpy(np.array(x[start:stop]))


def embed_split(trained: TrainedModel, split: str, *, batch_size: int = 256, rows: slice | None = None,
                return_trunk: bool = True) -> SplitEmbeddings:
    """Embed (a slice of) a split in dataset order. Trunk features come from the feature cache
    when the run used it, else from running the trunk."""
    from hescape.data.shards import Shards

    model, info = trained.model, trained.info
    shards = Shards(info["shards"])
    data = shards.split(split)
    n = len(data)
    rows = rows or slice(0, n)
    start0, stop0 = rows.indices(n)[:2]
    image_src = np.load(info["image_features"][split], mmap_mode="r") if info.get("image_features") else data.images
    if info.get("gene_features"):
        gene_src, gene_transform = np.load(info["gene_features"][split], mmap_mode="r"), None
    else:
        # The transform is per spot (training-split statistics only), so transforming just the rows
        # of each batch gives what gene_inputs gives for the whole split, without a task embedding one
        # slice having to transform all of it.
        from hescape.data.gene_transforms import transform_for

        gene_src, gene_transform = data.counts, transform_for(model.gene_trunk, shards.gene_stats())
    device = next(iter(model.parameters())).device
    out = {"image": [], "gene": [], "image_trunk": [], "gene_trunk": []}
    with torch.no_grad():
        for start in range(start0, stop0, batch_size):
            stop = min(stop0, start + batch_size)
            img_in = _rows(image_src, start, stop).to(device)
            if gene_transform is None:
                gene_in = _rows(gene_src, start, stop)
            else:
                gene_in = gene_transform(np.asarray(gene_src[start:stop]))
                gene_in = gene_in if isinstance(gene_in, torch.Tensor) else torch.from_numpy(np.asarray(gene_in))
            gene_in = gene_in.to(device)
            if model.image_trunk is not None:
                from hescape.data.image_transforms import to_model_input

                img_feat = model.image_trunk(to_model_input(img_in, model.image_norm))
            else:
                img_feat = img_in.float()
            gene_feat = model.gene_trunk(gene_in) if model.gene_trunk is not None else gene_in.float()
            out["image"].append(model.image_head(img_feat.float()).cpu().numpy())
            out["gene"].append(model.gene_head(gene_feat.float()).cpu().numpy())
            if return_trunk:
                out["image_trunk"].append(img_feat.float().cpu().numpy())
                out["gene_trunk"].append(gene_feat.float().cpu().numpy())
    cat = {k: (np.concatenate(v) if v else None) for k, v in out.items()}
    return SplitEmbeddings(image=cat["image"], gene=cat["gene"], image_trunk=cat["image_trunk"],
                           gene_trunk=cat["gene_trunk"])
