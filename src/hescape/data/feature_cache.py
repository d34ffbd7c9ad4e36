"""Frozen-feature cache: a frozen trunk's features are computed once per (panel hash, encoder,
transform) and stored, so training of the heads never runs the trunk again.

The reference code recomputed frozen trunks at every step (and left them in train mode); with the
cache, a frozen-trunk epoch costs only the heads (see ``benchmarks/bench_feature_cache.py``).

Layout: ``<cache_dir>/features/<key>/{train,val,test}.npy`` (float32) + ``key.json`` describing
exactly what the key stands for.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hescape.io import atomic_dir, write_json

log = logging.getLogger(__name__)


def cache_key(description: dict) -> str:
    """A short stable hash of everything that determines the features."""
    payload = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class FeatureCache:
    """Directory of cached per-split feature matrices."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir).resolve() / "features"  # absolute: Ray workers run elsewhere

    def path(self, description: dict) -> Path:
        return self.root / cache_key(description)

    def get_or_compute(self, description: dict, splits: list[str],
                       compute: Callable[[str], np.ndarray]) -> dict[str, Path]:
        """Return ``split -> .npy path``; compute and store all splits atomically on a miss."""
        target = self.path(description)
        if all((target / f"{s}.npy").exists() for s in splits):
            log.info("feature cache hit: %s", target)
            return {s: target / f"{s}.npy" for s in splits}
        log.info("feature cache miss: computing %s", target)
        with atomic_dir(target, overwrite=True, keep_existing=True) as tmp:
            for split in splits:
                feats = np.asarray(compute(split), dtype=np.float32)
                np.save(tmp / f"{split}.npy", feats)
            write_json(tmp / "key.json", description)
        return {s: target / f"{s}.npy" for s in splits}


def compute_image_features(encoder, images: np.ndarray, norm, *, batch_size: int = 128, device: str = "cpu",
                           progress: bool = True, desc: str = "features") -> np.ndarray:
    """Run a frozen image encoder (eval mode, no grad) over uint8 ``(N, H, W, 3)`` patches."""
    import torch
    from tqdm.auto import tqdm

    from hescape.data.image_transforms import to_model_input

    encoder = encoder.to(device).eval()
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, unit="batch"):
            batch = torch.from_numpy(np.array(images[start:start + batch_size])).to(device)  # copy off the memmap
            out.append(encoder(to_model_input(batch, norm)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.feature_dim), np.float32)
