"""Training shards: decoded uint8 patches and raw counts per split, memory-mappable.

``hescape preprocess`` turns a curated panel into::

    <root>/<panel>-<panel hash>-<size>px[-<crop>um]/
      manifest.json        panel hash, genes, image size, crop, per-split sizes, train-only gene stats
      train/images.npy     (N, S, S, 3) uint8, cropped in µm and resized to the training resolution
      train/counts.npy     (N, G) int32 raw counts
      train/obs.parquet    sample, donor, tissue, labels, coordinates
      val/...  test/...

so that no PNG is decoded on the training hot path. A shard directory is keyed by everything that
determines its content and is reused when it already exists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hescape.data import keys
from hescape.data.image_transforms import crop_and_resize
from hescape.data.panel import PanelMeta, decode_png, read_meta, read_records
from hescape.data.registry import SPLITS
from hescape.errors import DataError
from hescape.io import atomic_dir, write_json

MANIFEST = "manifest.json"
SHARD_VERSION = 1


@dataclass
class PreprocessConfig:
    """The ``preprocess`` block of params.yaml.

    Attributes
    ----------
    image_size
        Side of the stored patches in px (the training resolution).
    crop_um
        Field of view kept around the spot centre, in µm; ``None`` keeps the whole stored patch
        (whose physical size the curated panel already fixes).
    out_dir
        Root under which shard directories are created.
    """

    image_size: int = 64
    crop_um: float | None = None
    out_dir: str = "data/shards"


def shard_key(meta: PanelMeta, cfg: PreprocessConfig) -> str:
    crop = f"-{cfg.crop_um:g}um" if cfg.crop_um else ""
    return f"{meta.name}-{meta.content_hash}-{cfg.image_size}px{crop}"


def _pixel_size_of(meta: PanelMeta, sample: str) -> float | None:
    per_sample = (meta.provenance or {}).get("pixel_size_um")
    if isinstance(per_sample, dict) and sample in per_sample:
        return float(per_sample[sample])
    return meta.pixel_size_um


def build_shards(panel_dir: str | Path, cfg: PreprocessConfig, *, progress: bool = True,
                 overwrite: bool = False) -> Path:
    """Build (or reuse) the training shards of a curated panel; returns the shard directory."""
    from tqdm.auto import tqdm

    from hescape.data.gene_transforms import fit_gene_stats

    panel_dir = Path(panel_dir)
    meta = read_meta(panel_dir)
    if cfg.crop_um and meta.patch_size_um and cfg.crop_um > meta.patch_size_um + 1e-6:
        raise DataError(f"crop_um {cfg.crop_um} exceeds the panel's patch size {meta.patch_size_um} um",
                        file=panel_dir / keys.PANEL_JSON, field="patch_size_um")
    target = Path(cfg.out_dir) / shard_key(meta, cfg)
    if (target / MANIFEST).exists() and not overwrite:
        return target

    split_of = meta.split_of_sample()
    # Aliased splits (skin: val = test) reuse the target split's arrays.
    sizes = {s: 0 for s in SPLITS}
    for entry in meta.files:
        for sid in entry.get("samples", []):
            sizes[split_of[sid]] += entry["n_records"]
    # Keyed by content: a concurrent builder's finished copy is as good as ours (unless asked to rebuild).
    with atomic_dir(target, overwrite=True, keep_existing=not overwrite) as tmp:
        arrays, obs_parts, cursor = {}, {s: [] for s in SPLITS}, {s: 0 for s in SPLITS}
        for split in SPLITS:
            if sizes[split] == 0:
                continue
            (tmp / split).mkdir()
            arrays[split] = (
                np.lib.format.open_memmap(tmp / split / "images.npy", mode="w+", dtype=np.uint8,
                                          shape=(sizes[split], cfg.image_size, cfg.image_size, 3)),
                np.lib.format.open_memmap(tmp / split / "counts.npy", mode="w+", dtype=np.int32,
                                          shape=(sizes[split], meta.n_genes)),
            )
        bar = tqdm(total=sum(sizes.values()), desc=f"preprocess {meta.name}", unit="spot", disable=not progress)
        for entry in meta.files:
            path = panel_dir / entry["path"]
            rec = read_records(path, n_genes=meta.n_genes, images=True)
            sids = rec.obs[keys.SAMPLE].to_numpy()
            for sid in pd.unique(sids):
                rows = np.flatnonzero(sids == sid)
                split = split_of[sid]
                images, counts = arrays[split]
                start = cursor[split]
                pixel_size = _pixel_size_of(meta, sid)
                for j, r in enumerate(rows):
                    patch = decode_png(rec.images[r], file=path, record=int(r))
                    try:
                        images[start + j] = crop_and_resize(patch, pixel_size_um=pixel_size, crop_um=cfg.crop_um,
                                                            out_px=cfg.image_size)
                    except ValueError as exc:
                        raise DataError(str(exc), file=path, record=int(r), field=keys.IMAGE) from exc
                    bar.update(1)
                counts[start:start + len(rows)] = rec.counts[rows]
                part = rec.obs.iloc[rows].reset_index(drop=True)
                part[keys.SPLIT] = split
                obs_parts[split].append(part)
                for name, value in rec.obsm.items():
                    arrays.setdefault((split, name), []).append(value[rows])
                cursor[split] += len(rows)
        bar.close()
        for split, (images, counts) in ((s, arrays[s]) for s in SPLITS if s in arrays):
            images.flush()
            counts.flush()
            pd.concat(obs_parts[split], ignore_index=True).to_parquet(tmp / split / "obs.parquet")
            for key, parts in list(arrays.items()):
                if isinstance(key, tuple) and key[0] == split:
                    np.save(tmp / split / f"obsm_{key[1]}.npy", np.concatenate(parts))
        train_counts = np.load(tmp / "train" / "counts.npy", mmap_mode="r")
        stats = fit_gene_stats(np.asarray(train_counts))
        manifest = {
            "version": SHARD_VERSION,
            "panel_name": meta.name,
            "panel_hash": meta.content_hash,
            "panel_dir": str(panel_dir),
            "genes": meta.genes,
            "label_columns": meta.label_columns,
            "split_aliases": meta.split_aliases,
            "sizes": {s: n for s, n in sizes.items() if n},
            "preprocess": asdict(cfg),
            "pixel_size_um": meta.pixel_size_um,
            "patch_size_um": cfg.crop_um or meta.patch_size_um,
            "gene_stats": stats.to_json(),
        }
        write_json(tmp / MANIFEST, manifest)
    return target


@dataclass
class SplitShard:
    """Memory-mapped arrays of one split."""

    images: np.ndarray
    counts: np.ndarray
    obs: pd.DataFrame
    obsm: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.obs)


class Shards:
    """A shard directory opened for reading (arrays are memory-mapped, not loaded)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.exists():
            raise DataError("not a shard directory (no manifest.json); run `hescape preprocess`", file=self.root)
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("version") != SHARD_VERSION:
            raise DataError(f"shard version {self.manifest.get('version')} != {SHARD_VERSION}; rebuild",
                            file=path, field="version")

    @property
    def genes(self) -> list[str]:
        return self.manifest["genes"]

    @property
    def panel_hash(self) -> str:
        return self.manifest["panel_hash"]

    @property
    def image_size(self) -> int:
        return int(self.manifest["preprocess"]["image_size"])

    def gene_stats(self):
        from hescape.data.gene_transforms import GeneStats

        return GeneStats.from_json(self.manifest["gene_stats"])

    def split(self, name: str) -> SplitShard:
        actual = self.manifest.get("split_aliases", {}).get(name, name)
        d = self.root / actual
        if not d.is_dir():
            raise DataError(f"shards have no {name!r} split", file=self.root)
        obsm = {p.stem.removeprefix("obsm_"): np.load(p) for p in sorted(d.glob("obsm_*.npy"))}
        return SplitShard(
            images=np.load(d / "images.npy", mmap_mode="r"),
            counts=np.load(d / "counts.npy", mmap_mode="r"),
            obs=pd.read_parquet(d / "obs.parquet"),
            obsm=obsm,
        )
