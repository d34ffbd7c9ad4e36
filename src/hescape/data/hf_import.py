"""Import a download of the Hugging Face dataset ``Peng-AI/hescape-pyarrow`` as a curated panel.

The dataset has one config per panel (config name = panel name) with one split, ``train``::

    <src>/<config>/train-00000-of-0000N.parquet      (also <src>/data/<config>/..., or the files
    <src>/<config>/train-00001-of-0000N.parquet       directly in <src>)

Records carry ``name`` (ClassLabel: sample id), ``image`` (struct of PNG ``bytes`` and ``path``),
``gexp`` (raw counts, shape (1, G)), ``source`` and ``tissue`` (ClassLabel), ``cell_coords`` and
HEST metadata strings. ClassLabel integers are decoded with the names in the parquet schema's
``huggingface`` features metadata (:func:`hescape.data.panel.read_records`).

The import applies the panel's record filter from the registry, keeps the samples of the
protocol's splits (or of ``--splits-dir`` tables), assigns donors, checks every record, and writes
the curated panel atomically. The Hugging Face patches carry no micrometre information: the panel's
``pixel_size_um`` / ``patch_size_um`` stay ``None`` unless split tables give a pixel size per sample,
which then goes to ``provenance["pixel_size_um"]``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hescape.data import keys
from hescape.data.panel import Panel, PanelMeta, Records, concat_records, hf_features, read_records, write_panel
from hescape.data.registry import (
    SPLITS,
    PanelSpec,
    get_panel_spec,
    panel_names,
    read_gene_file,
    read_split_tables,
)
from hescape.errors import DataError
from hescape.io import sha256_file

log = logging.getLogger(__name__)

HF_DATASET = "Peng-AI/hescape-pyarrow"
PROVENANCE_SOURCE = f"hf:{HF_DATASET}"
REGISTRY_FILE = "hescape/data/panels.yaml"
PIXEL_SIZE_COLUMN = "pixel_size_um_estimated"


@dataclass
class HFImportReport:
    """What an import read, kept and dropped.

    Attributes
    ----------
    dropped_by_filter
        ``sample -> records`` failing the panel's record filter.
    dropped_not_in_splits
        ``sample -> records`` of samples that passed the filter but are in no split.
    missing_samples
        Split samples without any record (only non-empty with ``allow_missing=True``).
    """

    meta: PanelMeta
    out_dir: Path
    files: list[Path]
    n_read: int
    n_kept: int
    spots_per_split: dict[str, int]
    spots_per_sample: dict[str, int]
    dropped_by_filter: dict[str, int] = field(default_factory=dict)
    dropped_not_in_splits: dict[str, int] = field(default_factory=dict)
    missing_samples: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "panel": self.meta.name,
            "out_dir": str(self.out_dir),
            "files": [str(p) for p in self.files],
            "n_read": self.n_read,
            "n_kept": self.n_kept,
            "n_genes": self.meta.n_genes,
            "patch_size_px": self.meta.patch_size_px,
            "splits": self.meta.splits,
            "split_aliases": self.meta.split_aliases,
            "spots_per_split": self.spots_per_split,
            "spots_per_sample": self.spots_per_sample,
            "dropped_by_filter": self.dropped_by_filter,
            "dropped_not_in_splits": self.dropped_not_in_splits,
            "missing_samples": self.missing_samples,
        }


#  Locating the files


def find_parquet_files(src: str | Path, panel: str) -> list[Path]:
    """The parquet files of ``panel``'s config in a download directory, in name order.

    Files are found recursively (hidden directories such as ``.cache`` are skipped). When several
    configs are present, the files under a directory named after the panel are taken; a download
    whose only config is another known panel is refused.
    """
    src = Path(src)
    if src.is_file() and src.suffix == ".parquet":
        return [src]
    if not src.is_dir():
        raise DataError("download directory does not exist", file=src)
    files = sorted(
        p for p in src.rglob("*.parquet")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
    )
    if not files:
        raise DataError("no parquet files found (expected <src>/<config>/train-*.parquet)", file=src)
    if src.name == panel:
        return files
    dirs = {p: p.relative_to(src).parts[:-1] for p in files}
    named = [p for p in files if panel in dirs[p]]
    if named:
        return named
    others = sorted({part for parts in dirs.values() for part in parts if part in set(panel_names())})
    if others:
        raise DataError(f"no parquet files of config {panel!r}; the download holds config(s) {others}", file=src)
    parents = sorted({str(p.parent.relative_to(src)) for p in files})
    if len(parents) > 1:
        raise DataError(f"parquet files in several directories {parents} and none is named {panel!r}", file=src)
    return files


def _gexp_length(path: Path) -> int:
    """Genes per record: the ``Array2D`` shape in the features metadata, else the first record's length."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"not a readable parquet file: {exc}", file=path) from exc
    feat = hf_features(pf.schema_arrow).get(keys.GEXP)
    if isinstance(feat, dict) and isinstance(feat.get("shape"), list) and feat["shape"]:
        return int(feat["shape"][-1])
    if keys.GEXP not in pf.schema_arrow.names:
        raise DataError(f"missing column {keys.GEXP!r}; found {pf.schema_arrow.names}", file=path, field=keys.GEXP)
    if pf.metadata.num_rows == 0:
        raise DataError("file holds no records", file=path)
    first = pf.read_row_group(0, columns=[keys.GEXP]).column(keys.GEXP).combine_chunks()[:1]
    while hasattr(first.type, "value_type") and hasattr(first.type.value_type, "value_type"):
        first = pc.list_flatten(first)
    return int(pc.list_value_length(first)[0].as_py())


#  Splits and donors


def _splits_from_tables(directory: Path, spec: PanelSpec) -> tuple[PanelSpec, dict[str, float], dict]:
    """Splits, patients and per-sample pixel sizes from HESCAPE split CSVs."""
    tables = read_split_tables(directory)
    patients: dict[str, tuple[str, str]] = {}
    pixel: dict[str, float] = {}
    for split, rows in tables.items():
        for sid, row in rows.items():
            patient = (row.get("patient") or "").strip()
            if patient:
                patients[sid] = ((row.get("dataset_title") or "").strip() or spec.name, patient)
            raw = (row.get(PIXEL_SIZE_COLUMN) or "").strip()
            if raw:
                try:
                    value = float(raw)
                except ValueError:
                    value = math.nan
                if not (math.isfinite(value) and value > 0):
                    raise DataError(f"pixel size {raw!r} is not a positive number", file=directory / f"{split}.csv",
                                    record=sid, field=PIXEL_SIZE_COLUMN)
                pixel[sid] = value
    spec = dataclasses.replace(spec, splits={s: list(tables[s]) for s in SPLITS}, patients=patients)
    hashes = {f"{s}.csv": sha256_file(directory / f"{s}.csv") for s in SPLITS}
    return spec, pixel, hashes


def resolve_splits(splits: dict[str, list[str]], *, file=None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Curated splits and aliases from a split listing.

    A val split equal to the test split (the skin panel's single held-out sample) is written under
    ``test`` with the alias ``{"val": "test"}``; any other sample listed twice is an error.
    """
    out = {s: list(dict.fromkeys(splits.get(s, []))) for s in SPLITS}
    aliases: dict[str, str] = {}
    if out["val"] and set(out["val"]) == set(out["test"]):
        out["val"], aliases = [], {"val": "test"}
    seen: dict[str, str] = {}
    for split in SPLITS:
        for sid in out[split]:
            if sid in seen:
                raise DataError(f"sample {sid!r} is in both {seen[sid]} and {split}", file=file, field="splits")
            seen[sid] = split
    return out, aliases


#  Records


def _filter_mask(rec: Records, spec: PanelSpec, path: Path) -> np.ndarray:
    if not spec.filter_column:
        return np.ones(len(rec.obs), dtype=bool)
    if spec.filter_column not in rec.obs:
        raise DataError(f"the panel's record filter needs column {spec.filter_column!r}", file=path,
                        field=spec.filter_column)
    wanted = {v.strip().lower() for v in spec.filter_values}
    values = rec.obs[spec.filter_column].to_numpy()
    return np.array([v is not None and str(v).strip().lower() in wanted for v in values], dtype=bool)


def image_size(data: bytes, *, file=None, record=None) -> tuple[int, int]:
    """``(width, height)`` of an encoded image, after checking its integrity (without a full decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            img.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"undecodable image: {exc}", file=file, record=record, field=keys.IMAGE) from exc
    return size


def _subset(rec: Records, index: np.ndarray) -> Records:
    return Records(
        obs=rec.obs.iloc[index].reset_index(drop=True),
        counts=rec.counts[index],
        images=None if rec.images is None else [rec.images[i] for i in index],
        obsm={k: v[index] for k, v in rec.obsm.items()},
    )


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def _merge(total: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0) + v


#  The import


def import_hf(src: str | Path, panel: str, genes_file: str | Path, out_dir: str | Path, *,
              splits_dir: str | Path | None = None, allow_missing: bool = False,
              overwrite: bool = False) -> HFImportReport:
    """Turn a download of ``Peng-AI/hescape-pyarrow`` into a curated panel directory.

    Parameters
    ----------
    src
        Download directory (or one parquet file).
    panel
        Registry panel name (= Hugging Face config name).
    genes_file
        Gene symbols (and Ensembl ids) in ``gexp`` order (:func:`hescape.data.registry.read_gene_file`).
    out_dir
        Curated panel directory to write.
    splits_dir
        HESCAPE split tables (``{train,val,test}.csv``) replacing the registry's splits and patients;
        their ``pixel_size_um_estimated`` goes to ``provenance["pixel_size_um"]``.
    allow_missing
        Import although some split samples have no records (they are removed from the splits).
    overwrite
        Replace an existing ``out_dir``.

    Raises
    ------
    DataError
        On any bad input, naming the file, record and field; nothing is written then.
    """
    src, out_dir, genes_file = Path(src), Path(out_dir), Path(genes_file)
    spec = get_panel_spec(panel)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    pixel_sizes: dict[str, float] = {}
    split_hashes: dict = {}
    splits_file = REGISTRY_FILE
    if splits_dir is not None:
        spec, pixel_sizes, split_hashes = _splits_from_tables(Path(splits_dir), spec)
        splits_file = Path(splits_dir)
    splits, aliases = resolve_splits(spec.splits, file=splits_file)
    split_of = {sid: split for split, ids in splits.items() for sid in ids}

    files = find_parquet_files(src, panel)
    n_genes = _gexp_length(files[0])
    if n_genes != spec.n_genes:
        raise DataError(f"gexp vectors have {n_genes} values but panel {panel!r} has {spec.n_genes} genes "
                        f"(wrong --panel or another config's files?)", file=files[0], field=keys.GEXP)
    symbols, ensembl = read_gene_file(genes_file)
    if len(symbols) != n_genes:
        raise DataError(f"gene list has {len(symbols)} symbols but the gexp vectors of {files[0].name} have "
                        f"{n_genes} values", file=genes_file, field="symbol")
    if ensembl is not None and not any(ensembl):
        ensembl = None

    kept_parts: list[Records] = []
    n_read = 0
    dropped_filter: dict[str, int] = {}
    dropped_splits: dict[str, int] = {}
    patch_size: tuple[int, int] | None = None
    patch_from: tuple[Path, int] | None = None
    for path in files:
        log.info("reading %s", path)
        rec = read_records(path, n_genes=n_genes, images=True)
        n_read += len(rec.obs)
        samples = rec.obs[keys.SAMPLE].to_numpy()
        passes = _filter_mask(rec, spec, path)
        in_splits = np.array([s in split_of for s in samples], dtype=bool)
        _merge(dropped_filter, _count(samples[~passes]))
        _merge(dropped_splits, _count(samples[passes & ~in_splits]))
        index = np.flatnonzero(passes & in_splits)
        for i in index:
            size = image_size(rec.images[i], file=path, record=int(i))
            if size[0] != size[1]:
                raise DataError(f"image is {size[0]}x{size[1]} px; square patches expected", file=path,
                                record=int(i), field=keys.IMAGE)
            if patch_size is None:
                patch_size, patch_from = size, (path, int(i))
            elif size != patch_size:
                raise DataError(f"image is {size[0]}x{size[1]} px but record {patch_from[1]} of "
                                f"{patch_from[0]} is {patch_size[0]}x{patch_size[1]} px",
                                file=path, record=int(i), field=keys.IMAGE)
        if index.size:
            kept_parts.append(_subset(rec, index))
        del rec

    present = set().union(*(set(p.obs[keys.SAMPLE]) for p in kept_parts)) if kept_parts else set()
    missing = [sid for split in SPLITS for sid in splits[split] if sid not in present]
    if missing and not allow_missing:
        raise DataError(f"sample(s) {missing} of the splits have no records passing the filter "
                        f"({spec.filter_column} in {list(spec.filter_values)}); pass --allow-missing-samples "
                        f"to import the others", file=src, field=keys.NAME)
    splits = {s: [sid for sid in ids if sid in present] for s, ids in splits.items()}
    for split in SPLITS:
        if not splits[split] and split not in aliases:
            raise DataError(f"split {split!r} has no records in the download", file=src, field=keys.NAME)

    rec = concat_records(kept_parts)
    del kept_parts
    obs = rec.obs
    obs[keys.DONOR] = [spec.donor_of(s) for s in obs[keys.SAMPLE]]
    provenance = {
        "source": PROVENANCE_SOURCE,
        "config": panel,
        "inputs": [{"path": str(p.relative_to(src)) if p != src else p.name, "sha256": sha256_file(p)}
                   for p in files],
        "genes_file": {"path": genes_file.name, "sha256": sha256_file(genes_file)},
        "filter": {"column": spec.filter_column, "values": list(spec.filter_values)},
        "splits_from": "registry" if splits_dir is None else str(Path(splits_dir)),
        "n_read": n_read,
        "dropped_by_filter": dropped_filter,
        "dropped_not_in_splits": dropped_splits,
        "missing_samples": missing,
    }
    if split_hashes:
        provenance["split_tables"] = split_hashes
    if pixel_sizes:
        kept_px = {sid: v for sid, v in pixel_sizes.items() if sid in present}
        provenance["pixel_size_um"] = kept_px
        provenance["patch_size_um"] = {sid: v * patch_size[0] for sid, v in kept_px.items()}
    meta = PanelMeta(name=panel, genes=symbols, ensembl_ids=ensembl, splits=splits, split_aliases=aliases,
                     patch_size_px=int(patch_size[0]), patch_size_um=None, pixel_size_um=None,
                     provenance=provenance)
    meta = write_panel(Panel(meta=meta, obs=obs, counts=rec.counts, images=rec.images, obsm=rec.obsm),
                       out_dir, overwrite=overwrite)
    spots_per_sample = _count(obs[keys.SAMPLE])
    spots_per_split = {s: sum(spots_per_sample.get(sid, 0) for sid in meta.samples_of(s)) for s in SPLITS}
    return HFImportReport(meta=meta, out_dir=out_dir, files=files, n_read=n_read, n_kept=len(obs),
                          spots_per_split=spots_per_split, spots_per_sample=spots_per_sample,
                          dropped_by_filter=dropped_filter, dropped_not_in_splits=dropped_splits,
                          missing_samples=missing)
