"""Curated panel directories: ``panel.json`` + parquet files in the HESCAPE record layout.

A curated panel is the unit the platform versions (DVC), trains and evaluates on::

    my-panel/
      panel.json            name, genes (gexp order), pixel/patch size, splits, provenance + hashes
      part-00000.parquet    records of one sample: name, image{bytes,path}, gexp (1, G), source,
      part-00001.parquet    tissue, cell_coords, donor, optional labels / simulator ground truth
      ...

The same reader loads a raw download of the Hugging Face dataset ``Peng-AI/hescape-pyarrow``:
ClassLabel columns are stored there as integers whose names live in the ``huggingface`` features
metadata of the parquet schema; :func:`read_records` decodes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hescape.data import keys
from hescape.data.registry import SPLITS
from hescape.errors import DataError
from hescape.io import atomic_dir, sha256_file, write_json

#  Panel metadata


@dataclass
class PanelMeta:
    """Contents of ``panel.json``.

    Attributes
    ----------
    name
        Panel name (a registry name for HESCAPE panels, anything for others).
    genes
        Gene symbols in ``gexp`` order.
    patch_size_px, patch_size_um, pixel_size_um
        Side of the stored patches in pixels and micrometres, and µm per stored pixel
        (``None`` where the source does not say, e.g. the Hugging Face patches).
    splits
        ``split -> [sample ids]``; every sample in exactly one split.
    split_aliases
        Splits that reuse another split's samples, e.g. ``{"val": "test"}`` for the skin panel
        whose only held-out sample serves both. Validation of an aliased split is flagged in results.
    files
        ``[{"path", "sha256", "n_records", "samples"}]`` of the parquet files.
    provenance
        Where the data came from (``source``, parameters, input hashes).
    """

    name: str
    genes: list[str]
    splits: dict[str, list[str]]
    patch_size_px: int | None = None
    patch_size_um: float | None = None
    pixel_size_um: float | None = None
    ensembl_ids: list[str] | None = None
    split_aliases: dict[str, str] = field(default_factory=dict)
    label_columns: list[str] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    format_version: int = keys.FORMAT_VERSION

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def content_hash(self) -> str:
        """Hash of the panel's content (genes, splits, file hashes): the key of every derived cache."""
        payload = json.dumps(
            {"genes": self.genes, "splits": self.splits, "aliases": self.split_aliases,
             "files": sorted(f["sha256"] for f in self.files)},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def samples_of(self, split: str) -> list[str]:
        """Sample ids used for ``split``, following aliases."""
        return list(self.splits.get(self.split_aliases.get(split, split), []))

    def split_of_sample(self) -> dict[str, str]:
        return {sid: split for split, ids in self.splits.items() for sid in ids}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict, *, file=None) -> PanelMeta:
        for required in ("name", "genes", "splits"):
            if required not in obj:
                raise DataError("missing key", file=file, field=required)
        known = set(cls.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise DataError(f"unknown keys {sorted(unknown)}", file=file)
        if obj.get("format_version", 1) > keys.FORMAT_VERSION:
            raise DataError(f"format_version {obj['format_version']} is newer than this reader",
                            file=file, field="format_version")
        return cls(**obj)


def read_meta(panel_dir: str | Path) -> PanelMeta:
    """Read and check ``panel.json`` of a curated panel directory."""
    path = Path(panel_dir) / keys.PANEL_JSON
    if not path.exists():
        raise DataError("not a curated panel directory (no panel.json)", file=panel_dir)
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc}", file=path) from exc
    meta = PanelMeta.from_json(obj, file=path)
    check_splits(meta, file=path)
    return meta


def check_splits(meta: PanelMeta, *, file=None) -> None:
    """Every sample in one split, no empty split (unless aliased), aliases point at real splits."""
    seen: dict[str, str] = {}
    for split, ids in meta.splits.items():
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} (expected {SPLITS})", file=file, field="splits")
        for sid in ids:
            if sid in seen:
                raise DataError(f"sample {sid!r} is in two splits: {seen[sid]} and {split}",
                                file=file, field="splits")
            seen[sid] = split
    for alias, target in meta.split_aliases.items():
        if alias not in SPLITS or target not in SPLITS or alias == target:
            raise DataError(f"bad split alias {alias!r} -> {target!r}", file=file, field="split_aliases")
        if meta.splits.get(alias):
            raise DataError(f"split {alias!r} is aliased to {target!r} but also lists samples",
                            file=file, field="split_aliases")
    for split in SPLITS:
        if not meta.samples_of(split):
            raise DataError(f"split {split!r} is empty", file=file, field="splits")


#  In-memory panel


@dataclass
class Panel:
    """A panel in memory: one row of ``obs`` per spot.

    Attributes
    ----------
    meta
        The panel's metadata (``panel.json``).
    obs
        ``sample_id``, ``donor``, ``split``, ``tissue``, ``source``, ``x``, ``y`` and any label columns.
    counts
        ``(n_spots, n_genes)`` raw integer counts (int32).
    images
        PNG bytes per spot, or ``None`` when read with ``images=False``.
    obsm
        Per-spot arrays, e.g. the simulator's ``composition`` ground truth.
    """

    meta: PanelMeta
    obs: pd.DataFrame
    counts: np.ndarray
    images: list[bytes] | None = None
    obsm: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.obs)

    def split_mask(self, split: str) -> np.ndarray:
        """Boolean mask of the spots used for ``split`` (following aliases)."""
        return self.obs[keys.SAMPLE].isin(self.meta.samples_of(split)).to_numpy()

    def subset(self, mask_or_index) -> Panel:
        idx = np.flatnonzero(mask_or_index) if np.asarray(mask_or_index).dtype == bool else np.asarray(mask_or_index)
        return Panel(
            meta=self.meta,
            obs=self.obs.iloc[idx].reset_index(drop=True),
            counts=self.counts[idx],
            images=None if self.images is None else [self.images[i] for i in idx],
            obsm={k: v[idx] for k, v in self.obsm.items()},
        )

    def decode_images(self, index: Sequence[int] | None = None) -> np.ndarray:
        """Decode PNG patches to a ``(n, H, W, 3)`` uint8 array."""
        if self.images is None:
            raise ValueError("panel was read without images")
        index = range(len(self.images)) if index is None else index
        return np.stack([decode_png(self.images[i], record=i) for i in index])

    def to_anndata(self):
        """AnnData view for scverse tools: ``X`` raw counts, ``obs``, ``obsm`` ground truth, ``uns`` meta."""
        import anndata as ad

        var = pd.DataFrame(index=pd.Index(self.meta.genes, name="symbol"))
        if self.meta.ensembl_ids:
            var["ensembl_id"] = self.meta.ensembl_ids
        obs = self.obs.copy()
        obs.index = obs.index.astype(str)
        return ad.AnnData(
            X=self.counts.astype(np.float32),
            obs=obs,
            var=var,
            obsm={k: np.asarray(v) for k, v in self.obsm.items()},
            uns={"panel": {"name": self.meta.name, "content_hash": self.meta.content_hash}},
        )


#  Images


def decode_png(data: bytes, *, file=None, record=None) -> np.ndarray:
    """Decode image bytes to ``(H, W, 3)`` uint8 RGB; a bad image names its record."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise DataError("image has no bytes", file=file, record=record, field=keys.IMAGE)
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"undecodable image: {exc}", file=file, record=record, field=keys.IMAGE) from exc


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode a ``(H, W, 3)`` uint8 array as PNG (lossless; low compression for speed)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), "RGB").save(
        buf, format="PNG", compress_level=compress_level
    )
    return buf.getvalue()


#  Reading records


def hf_features(schema: pa.Schema) -> dict:
    """The Hugging Face ``features`` dict stored in a parquet schema's metadata ({} if absent)."""
    meta = schema.metadata or {}
    raw = meta.get(b"huggingface")
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return (info.get("info") or {}).get("features") or {}


def _decode_classlabel(column: pa.ChunkedArray, names: list[str], *, file, fieldname) -> pa.Array:
    values = column.to_numpy(zero_copy_only=False)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out[i] = None
        elif not (0 <= int(v) < len(names)):
            raise DataError(f"class index {v} outside 0..{len(names) - 1}", file=file, record=i, field=fieldname)
        else:
            out[i] = names[int(v)]
    return pa.array(out, type=pa.string())


def _counts_matrix(column: pa.ChunkedArray, n_genes: int | None, *, file) -> np.ndarray:
    """``gexp`` (list of list, shape (1, G), or flat list of G) to an int32 ``(n, G)`` matrix."""
    arr = column.combine_chunks()
    n = len(arr)
    if arr.null_count:
        bad = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError("gexp is null", file=file, record=bad, field=keys.GEXP)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if pa.types.is_list(arr.type.value_type) or pa.types.is_large_list(arr.type.value_type) \
                or pa.types.is_fixed_size_list(arr.type.value_type):
            outer = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(outer != 1)
            if bad.size:
                raise DataError(f"gexp must have shape (1, G); got {outer[bad[0]]} rows",
                                file=file, record=int(bad[0]), field=keys.GEXP)
            arr = pc.list_flatten(arr)
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        expected = n_genes if n_genes is not None else (int(lengths[0]) if n else 0)
        bad = np.flatnonzero(lengths != expected)
        if bad.size:
            raise DataError(f"gexp has {lengths[bad[0]]} values, the panel has {expected} genes",
                            file=file, record=int(bad[0]), field=keys.GEXP)
        flat = pc.list_flatten(arr)
    else:
        raise DataError(f"gexp must be a list column, found {arr.type}", file=file, field=keys.GEXP)
    if flat.null_count:
        pos = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError("gexp holds a missing value", file=file, record=pos // max(expected, 1), field=keys.GEXP)
    values = flat.to_numpy(zero_copy_only=False).reshape(n, expected)
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not finite.all():
            rec = int(np.argwhere(~finite)[0, 0])
            raise DataError("gexp holds NaN or infinite counts", file=file, record=rec, field=keys.GEXP)
        frac = values != np.round(values)
        if frac.any():
            rec = int(np.argwhere(frac)[0, 0])
            raise DataError("gexp holds non-integer counts (raw counts expected)", file=file, record=rec,
                            field=keys.GEXP)
    elif values.dtype.kind not in "iu":
        raise DataError(f"gexp values must be numbers, found {values.dtype}", file=file, field=keys.GEXP)
    neg = values < 0
    if neg.any():
        rec = int(np.argwhere(neg)[0, 0])
        raise DataError("gexp holds negative counts", file=file, record=rec, field=keys.GEXP)
    if values.size and values.max() > np.iinfo(np.int32).max:
        rec = int(np.argwhere(values > np.iinfo(np.int32).max)[0, 0])
        raise DataError("gexp count too large for int32", file=file, record=rec, field=keys.GEXP)
    return values.astype(np.int32)


def _image_bytes(column: pa.ChunkedArray, *, file) -> list[bytes]:
    arr = column.combine_chunks()
    if pa.types.is_struct(arr.type):
        if arr.type.get_field_index("bytes") < 0:
            raise DataError("image struct has no 'bytes' field", file=file, field=keys.IMAGE)
        arr = arr.field("bytes")
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        raise DataError(f"image must be binary or a struct with bytes, found {arr.type}",
                        file=file, field=keys.IMAGE)
    out = arr.to_pylist()
    for i, b in enumerate(out):
        if not b:
            raise DataError("image has no bytes", file=file, record=i, field=keys.IMAGE)
    return out


def _coords(column: pa.ChunkedArray | None, n: int) -> np.ndarray:
    xy = np.full((n, 2), np.nan, dtype=np.float64)
    if column is None:
        return xy
    for i, v in enumerate(column.to_pylist()):
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(c, (int, float)) for c in v):
            xy[i] = v
    return xy


@dataclass
class Records:
    """The decoded content of one or more parquet files (before split/donor assignment)."""

    obs: pd.DataFrame
    counts: np.ndarray
    images: list[bytes] | None
    obsm: dict[str, np.ndarray]


def read_records(path: str | Path, *, n_genes: int | None = None, images: bool = True,
                 required: Iterable[str] = keys.REQUIRED_COLUMNS) -> Records:
    """Read one parquet file of HESCAPE records (curated or Hugging Face), checking every field."""
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"not a readable parquet file: {exc}", file=path) from exc
    schema = pf.schema_arrow
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise DataError(f"missing column(s) {missing}; found {schema.names}", file=path, field=missing[0])
    columns = [c for c in schema.names if images or c != keys.IMAGE]
    table = pf.read(columns=columns)
    features = hf_features(schema)
    n = table.num_rows

    # Decode ClassLabel integers to their names.
    decoded = {}
    for name in table.column_names:
        feat = features.get(name)
        if isinstance(feat, dict) and feat.get("_type") == "ClassLabel":
            col = table.column(name)
            if pa.types.is_integer(col.type):
                decoded[name] = _decode_classlabel(col, feat["names"], file=path, fieldname=name)

    def text_column(name: str) -> np.ndarray:
        if name in decoded:
            return decoded[name].to_numpy(zero_copy_only=False)
        col = table.column(name)
        vals = col.to_pylist()
        return np.array([None if v is None else str(v) for v in vals], dtype=object)

    names = text_column(keys.NAME)
    for i, v in enumerate(names):
        if v is None or v == "":
            raise DataError("missing sample id", file=path, record=i, field=keys.NAME)
    obs = pd.DataFrame({keys.SAMPLE: names})
    for col in (keys.TISSUE, keys.SOURCE, keys.DONOR, keys.CELL_TYPE):
        if col in table.column_names:
            obs[col] = text_column(col)
    xy = _coords(table.column(keys.CELL_COORDS) if keys.CELL_COORDS in table.column_names else None, n)
    obs[keys.X], obs[keys.Y] = xy[:, 0], xy[:, 1]

    skip = {keys.NAME, keys.IMAGE, keys.GEXP, keys.TISSUE, keys.SOURCE, keys.DONOR, keys.CELL_TYPE,
            keys.CELL_COORDS, *keys.OBSM_COLUMNS}
    for col in table.column_names:
        if col in skip:
            continue
        if col in decoded:
            obs[col] = decoded[col].to_numpy(zero_copy_only=False)
        elif pa.types.is_integer(table.column(col).type) or pa.types.is_floating(table.column(col).type) \
                or pa.types.is_boolean(table.column(col).type):
            obs[col] = table.column(col).to_numpy()
        elif pa.types.is_string(table.column(col).type) or pa.types.is_large_string(table.column(col).type):
            obs[col] = text_column(col)
        # Other nested metadata columns are not needed downstream and are dropped.

    counts = _counts_matrix(table.column(keys.GEXP), n_genes, file=path)
    obsm = {}
    for name in keys.OBSM_COLUMNS:
        if name in table.column_names:
            col = table.column(name).combine_chunks()
            k = len(col[0]) if n else 0
            obsm[name] = pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(n, k).astype(np.float32)
    imgs = _image_bytes(table.column(keys.IMAGE), file=path) if images else None
    return Records(obs=obs, counts=counts, images=imgs, obsm=obsm)


def concat_records(parts: list[Records]) -> Records:
    if not parts:
        raise ValueError("no records")
    obsm_keys = set.intersection(*(set(p.obsm) for p in parts))
    return Records(
        obs=pd.concat([p.obs for p in parts], ignore_index=True),
        counts=np.concatenate([p.counts for p in parts]),
        images=None if parts[0].images is None else [b for p in parts for b in p.images],
        obsm={k: np.concatenate([p.obsm[k] for p in parts]) for k in obsm_keys},
    )


#  Reading and writing curated panels


def read_panel(panel_dir: str | Path, *, images: bool = True, verify_hashes: bool = False,
               splits: Iterable[str] | None = None) -> Panel:
    """Read a curated panel directory into memory.

    Parameters
    ----------
    images
        Also load the PNG bytes (``False`` for expression-only work).
    verify_hashes
        Recompute each parquet file's SHA-256 against ``panel.json``.
    splits
        Only read the files of samples in these splits.
    """
    panel_dir = Path(panel_dir)
    meta = read_meta(panel_dir)
    wanted = None
    if splits is not None:
        wanted = {sid for s in splits for sid in meta.samples_of(s)}
    parts = []
    for entry in meta.files:
        if wanted is not None and not (set(entry.get("samples", [])) & wanted):
            continue
        path = panel_dir / entry["path"]
        if not path.exists():
            raise DataError("file listed in panel.json is missing", file=path)
        if verify_hashes and sha256_file(path) != entry["sha256"]:
            raise DataError("SHA-256 differs from panel.json (file changed or corrupt)", file=path)
        parts.append(read_records(path, n_genes=meta.n_genes, images=images))
    if not parts:
        raise DataError("panel has no records for the requested splits", file=panel_dir)
    rec = concat_records(parts)
    split_of = meta.split_of_sample()
    unknown = sorted(set(rec.obs[keys.SAMPLE]) - set(split_of))
    if unknown:
        raise DataError(f"records of samples in no split: {unknown[:5]}", file=panel_dir / keys.PANEL_JSON,
                        field="splits")
    rec.obs[keys.SPLIT] = rec.obs[keys.SAMPLE].map(split_of)
    if keys.DONOR not in rec.obs:
        rec.obs[keys.DONOR] = rec.obs[keys.SAMPLE]
    panel = Panel(meta=meta, obs=rec.obs, counts=rec.counts, images=rec.images, obsm=rec.obsm)
    if wanted is not None:
        panel = panel.subset(panel.obs[keys.SAMPLE].isin(wanted).to_numpy())
    return panel


def _record_table(panel: Panel, index: np.ndarray) -> pa.Table:
    obs = panel.obs.iloc[index]
    n_genes = panel.counts.shape[1]
    gexp = pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array(panel.counts[index].reshape(-1).astype(np.int32)), n_genes),
        1,
    )
    cols = {
        keys.NAME: pa.array(obs[keys.SAMPLE].astype(str).tolist(), pa.string()),
        keys.IMAGE: pa.StructArray.from_arrays(
            [pa.array([panel.images[i] for i in index], pa.binary()),
             pa.array([f"{obs[keys.SAMPLE].iloc[j]}_{int(i)}.png" for j, i in enumerate(index)], pa.string())],
            names=["bytes", "path"],
        ),
        keys.GEXP: gexp,
        keys.SOURCE: pa.array(obs[keys.SOURCE].astype(str).tolist(), pa.string()),
        keys.TISSUE: pa.array(obs[keys.TISSUE].astype(str).tolist(), pa.string()),
        keys.CELL_COORDS: pa.array(obs[[keys.X, keys.Y]].to_numpy(np.float64).tolist(), pa.list_(pa.float64())),
        keys.DONOR: pa.array(obs[keys.DONOR].astype(str).tolist(), pa.string()),
    }
    for col in panel.obs.columns:
        if col in (keys.SAMPLE, keys.SOURCE, keys.TISSUE, keys.X, keys.Y, keys.DONOR, keys.SPLIT):
            continue
        cols[col] = pa.array(obs[col].tolist())
    for name, arr in panel.obsm.items():
        arr = np.asarray(arr[index], dtype=np.float32)
        cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
    return pa.table(cols)


def write_panel(panel: Panel, out_dir: str | Path, *, overwrite: bool = False,
                provenance: dict | None = None) -> PanelMeta:
    """Write ``panel`` as a curated panel directory (one parquet file per sample), atomically.

    The files' SHA-256 and record counts go into ``panel.json``; the directory appears only when
    everything is written.
    """
    if panel.images is None:
        raise ValueError("cannot write a panel read without images")
    for col in (keys.SAMPLE, keys.DONOR, keys.TISSUE, keys.SOURCE):
        if col not in panel.obs:
            raise ValueError(f"panel.obs lacks column {col!r}")
    if panel.counts.shape != (len(panel.obs), panel.meta.n_genes):
        raise ValueError(f"counts shape {panel.counts.shape} != ({len(panel.obs)}, {panel.meta.n_genes})")
    out_dir = Path(out_dir)
    meta = PanelMeta(**{**asdict(panel.meta), "files": [], "provenance": {**panel.meta.provenance, **(provenance or {})}})
    check_splits(meta, file=out_dir / keys.PANEL_JSON)
    known = set(meta.split_of_sample())
    stray = sorted(set(panel.obs[keys.SAMPLE]) - known)
    if stray:
        raise DataError(f"samples in no split: {stray[:5]}", file=out_dir / keys.PANEL_JSON, field="splits")
    order = [sid for split in SPLITS for sid in meta.splits.get(split, [])]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for i, sid in enumerate(order):
            index = np.flatnonzero(panel.obs[keys.SAMPLE].to_numpy() == sid)
            if index.size == 0:
                continue
            rel = f"part-{i:05d}.parquet"
            pq.write_table(_record_table(panel, index), tmp / rel, compression="zstd")
            meta.files.append({"path": rel, "sha256": sha256_file(tmp / rel), "n_records": int(index.size),
                               "samples": [sid]})
        write_json(tmp / keys.PANEL_JSON, meta.to_json())
    return meta


#  Validation


@dataclass
class ValidationReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_panel(panel_dir: str | Path, *, check_images: bool = True) -> tuple[Panel, ValidationReport]:
    """Read every file of a curated panel with all checks; raise :class:`DataError` on the first
    error. Returns the panel and the warnings (e.g. a donor shared between train and test)."""
    panel_dir = Path(panel_dir)
    panel = read_panel(panel_dir, images=True, verify_hashes=True)
    meta = panel.meta
    report = ValidationReport()
    for entry in meta.files:
        n_file = int((panel.obs[keys.SAMPLE].isin(entry.get("samples", []))).sum())
        if n_file != entry["n_records"]:
            raise DataError(f"holds {n_file} records, panel.json says {entry['n_records']}",
                            file=panel_dir / entry["path"])
    if check_images:
        size = meta.patch_size_px
        file_of = {sid: panel_dir / e["path"] for e in meta.files for sid in e.get("samples", [])}
        record_in_file = panel.obs.groupby(keys.SAMPLE, sort=False).cumcount().to_numpy()
        samples = panel.obs[keys.SAMPLE].to_numpy()
        for i, data in enumerate(panel.images):
            where = {"file": file_of.get(samples[i], panel_dir), "record": int(record_in_file[i])}
            arr = decode_png(data, **where)
            if size is not None and arr.shape[:2] != (size, size):
                raise DataError(f"image is {arr.shape[1]}x{arr.shape[0]} px, panel.json says {size}x{size}",
                                field=keys.IMAGE, **where)
    present = set(panel.obs[keys.SAMPLE])
    for split in SPLITS:
        if not present & set(meta.samples_of(split)):
            raise DataError(f"split {split!r} has no records", file=panel_dir / keys.PANEL_JSON, field="splits")
    donors = {s: set(panel.obs.loc[panel.split_mask(s), keys.DONOR]) for s in SPLITS}
    for held_out in ("test", "val"):
        shared = donors["train"] & donors[held_out]
        if shared and meta.split_aliases.get(held_out) is None:
            report.warnings.append(f"donor(s) {sorted(shared)[:5]} in both train and {held_out}: "
                                   f"{held_out} scores are not on unseen donors")
    for w in report.warnings:
        warnings.warn(w, stacklevel=2)
    return panel, report


def summarize(panel: Panel) -> dict:
    """Counts per split / sample / donor / tissue, for ``hescape inspect``."""
    obs = panel.obs
    return {
        "name": panel.meta.name,
        "content_hash": panel.meta.content_hash,
        "n_spots": len(obs),
        "n_genes": panel.meta.n_genes,
        "patch_size_px": panel.meta.patch_size_px,
        "patch_size_um": panel.meta.patch_size_um,
        "pixel_size_um": panel.meta.pixel_size_um,
        "split_aliases": panel.meta.split_aliases,
        "spots_per_split": obs[keys.SPLIT].value_counts().reindex(list(SPLITS), fill_value=0).to_dict(),
        "spots_per_sample": obs[keys.SAMPLE].value_counts().sort_index().to_dict(),
        "spots_per_donor": obs[keys.DONOR].value_counts().sort_index().to_dict(),
        "spots_per_tissue": obs[keys.TISSUE].value_counts().sort_index().to_dict(),
        "median_counts_per_spot": float(np.median(panel.counts.sum(1))) if len(obs) else 0.0,
        "label_columns": panel.meta.label_columns,
    }
