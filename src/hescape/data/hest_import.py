"""Import a HEST-style directory (spatial transcriptomics + full-resolution H&E) as a curated panel.

Input layout (the field's common layout, as in HEST-1k)::

    <src>/st/<id>.h5ad           raw counts in X (dense or sparse), var_names = gene symbols,
                                 obsm["spatial"] = full-resolution pixel coordinates (x, y) of spot centres
    <src>/wsis/<id>.<tif|tiff|png|jpg|jpeg>   the full-resolution H&E image
    <src>/metadata/<id>.json     pixel_size_um_estimated (required), patient, organ/tissue, spot_diameter, ...

One patch is cut per spot at a fixed *physical* size (``patch_um``, default 112 µm) around the
spot centre, using the slide's µm/px, and resampled (antialiased) to ``patch_px`` pixels (default
224), so every slide has the same field of view. Coordinates are taken in the continuous pixel
frame (pixel ``i`` covers ``[i, i + 1)``); the crop box may fall between pixels. Spots whose patch
leaves the image are dropped and counted per sample.

Splits are by donor: a sample's donor is its metadata ``patient`` (qualified by ``dataset_title``
when given, since patient labels are local to a study), else the sample id. Named test/val samples
pull the other samples of their donor along; otherwise donors are shuffled with a fixed seed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hescape.data import keys
from hescape.data.panel import Panel, PanelMeta, encode_png, write_panel
from hescape.data.registry import SPLITS, read_gene_file
from hescape.errors import ConfigError, DataError
from hescape.io import sha256_file

log = logging.getLogger(__name__)

SOURCE = "hest"
WSI_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
PIXEL_SIZE_KEY = "pixel_size_um_estimated"
SPATIAL_KEY = "spatial"
COUNTS_FIELD = "X"
VAR_FIELD = "var_names"


@dataclass
class HestImportConfig:
    """Parameters of the HEST import (``params.yaml`` block ``import_hest``).

    Attributes
    ----------
    patch_um
        Side of every patch in micrometres.
    patch_px
        Side of every stored patch in pixels (``pixel_size_um = patch_um / patch_px``).
    seed
        Seed of the donor shuffle when test/val samples are not named.
    test_fraction, val_fraction
        Shares of donors held out (at least one donor each).
    """

    patch_um: float = 112.0
    patch_px: int = 224
    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.2

    def check(self) -> None:
        if not (math.isfinite(self.patch_um) and self.patch_um > 0):
            raise ConfigError(f"patch_um must be a positive number, got {self.patch_um}")
        if self.patch_px < 1:
            raise ConfigError(f"patch_px must be a positive integer, got {self.patch_px}")
        for name in ("test_fraction", "val_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")


@dataclass
class HestSample:
    """One sample's input files and metadata."""

    sample_id: str
    st: Path
    wsi: Path
    metadata_file: Path
    metadata: dict
    pixel_size_um: float
    donor: str
    tissue: str


@dataclass
class HestImportReport:
    meta: PanelMeta
    out_dir: Path
    spots_per_sample: dict[str, int]
    dropped_outside_image: dict[str, int]
    donors: dict[str, str]
    splits: dict[str, list[str]]
    moved_with_donor: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "panel": self.meta.name,
            "out_dir": str(self.out_dir),
            "n_genes": self.meta.n_genes,
            "patch_size_px": self.meta.patch_size_px,
            "patch_size_um": self.meta.patch_size_um,
            "pixel_size_um": self.meta.pixel_size_um,
            "splits": self.splits,
            "donors": self.donors,
            "spots_per_sample": self.spots_per_sample,
            "dropped_outside_image": self.dropped_outside_image,
            "moved_with_donor": self.moved_with_donor,
        }


#  Inputs


def _read_metadata(path: Path) -> dict:
    if not path.is_file():
        raise DataError("missing metadata file", file=path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"invalid JSON: {exc}", file=path) from exc
    if not isinstance(obj, dict):
        raise DataError("metadata must be a JSON object", file=path)
    return obj


def _text(value) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    return str(value).strip()


def donor_of(sample_id: str, metadata: dict) -> str:
    """``patient [dataset_title]`` (or ``patient``) from the metadata, else the sample id."""
    patient = _text(metadata.get("patient"))
    if not patient or patient.lower() in ("nan", "none", "na", "n/a"):
        return sample_id
    study = _text(metadata.get("dataset_title"))
    return f"{patient} [{study}]" if study else patient


def find_samples(src: str | Path) -> list[HestSample]:
    """The samples of a HEST-style directory (one per ``st/*.h5ad``), with their metadata checked."""
    src = Path(src)
    if not src.is_dir():
        raise DataError("HEST directory does not exist", file=src)
    st_dir = src / "st"
    st_files = sorted(st_dir.glob("*.h5ad")) if st_dir.is_dir() else []
    if not st_files:
        raise DataError("no st/<id>.h5ad files", file=st_dir)
    wsi_dir = src / "wsis"
    wsi_files = sorted(p for p in wsi_dir.iterdir() if p.suffix.lower() in WSI_SUFFIXES) if wsi_dir.is_dir() else []
    samples = []
    for st in st_files:
        sid = st.stem
        wsis = [p for p in wsi_files if p.stem == sid]
        if not wsis:
            raise DataError(f"no whole-slide image for sample {sid!r} (expected wsis/{sid}.<tif|png|jpg>)",
                            file=wsi_dir)
        if len(wsis) > 1:
            raise DataError(f"several whole-slide images for sample {sid!r}: {[p.name for p in wsis]}",
                            file=wsi_dir)
        meta_file = src / "metadata" / f"{sid}.json"
        metadata = _read_metadata(meta_file)
        raw = metadata.get(PIXEL_SIZE_KEY)
        if raw is None:
            raise DataError("missing pixel size (µm/px)", file=meta_file, field=PIXEL_SIZE_KEY)
        try:
            pixel = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError):
            pixel = math.nan
        if not (math.isfinite(pixel) and pixel > 0):
            raise DataError(f"pixel size {raw!r} is not a positive number", file=meta_file, field=PIXEL_SIZE_KEY)
        tissue = _text(metadata.get("tissue")) or _text(metadata.get("organ")) or "unknown"
        samples.append(HestSample(sample_id=sid, st=st, wsi=wsis[0], metadata_file=meta_file, metadata=metadata,
                                  pixel_size_um=pixel, donor=donor_of(sid, metadata), tissue=tissue))
    return samples


def check_counts(X, *, file, obs_names=None) -> np.ndarray:
    """Raw counts (dense or sparse) to a dense int32 array; non-integer, negative, NaN or too large
    values raise :class:`DataError` naming the file and the obs row."""
    import scipy.sparse as sp

    if sp.issparse(X):
        csr = sp.csr_matrix(X)
        data = csr.data

        def row_of(pos):
            return int(np.searchsorted(csr.indptr, pos, side="right") - 1)
    else:
        csr = None
        arr = np.asarray(X)
        data = arr.reshape(-1)
        n_cols = arr.shape[1] if arr.ndim == 2 else 1

        def row_of(pos):
            return int(pos // max(n_cols, 1))

    def fail(message, pos):
        row = row_of(pos)
        name = f" ({obs_names[row]!r})" if obs_names is not None else ""
        raise DataError(f"obs row {row}{name}: {message}", file=file, record=row, field=COUNTS_FIELD)

    if data.dtype.kind == "b":
        data = data.astype(np.int64)
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            fail("NaN or infinite count", int(np.flatnonzero(bad)[0]))
        bad = data != np.round(data)
        if bad.any():
            fail(f"non-integer count {data[np.flatnonzero(bad)[0]]!r} (raw counts expected)",
                 int(np.flatnonzero(bad)[0]))
    elif data.dtype.kind not in "iu":
        raise DataError(f"counts must be numbers, found {data.dtype}", file=file, field=COUNTS_FIELD)
    bad = data < 0
    if bad.any():
        fail(f"negative count {data[np.flatnonzero(bad)[0]]!r}", int(np.flatnonzero(bad)[0]))
    bad = data > np.iinfo(np.int32).max
    if bad.any():
        fail("count too large for int32", int(np.flatnonzero(bad)[0]))
    if csr is not None:
        return csr.toarray().astype(np.int32)
    return np.asarray(X).astype(np.int32)


def _read_st(sample: HestSample):
    import anndata as ad

    try:
        adata = ad.read_h5ad(sample.st)
    except Exception as exc:  # h5py/anndata raise many types for unreadable files
        raise DataError(f"not a readable h5ad file: {exc}", file=sample.st) from exc
    if SPATIAL_KEY not in adata.obsm:
        raise DataError("no spot coordinates (obsm['spatial'])", file=sample.st, field=f"obsm[{SPATIAL_KEY!r}]")
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or xy.shape[0] != adata.n_obs:
        raise DataError(f"obsm['spatial'] must be (n_obs, 2), found {xy.shape}", file=sample.st,
                        field=f"obsm[{SPATIAL_KEY!r}]")
    bad = ~np.isfinite(xy[:, :2]).all(1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"obs row {row}: spot coordinate is NaN or infinite", file=sample.st, record=row,
                        field=f"obsm[{SPATIAL_KEY!r}]")
    var_names = [str(v) for v in adata.var_names]
    if len(set(var_names)) != len(var_names):
        dup = sorted({v for v in var_names if var_names.count(v) > 1})[:5]
        raise DataError(f"duplicate gene symbols {dup}", file=sample.st, field=VAR_FIELD)
    return adata, xy[:, :2], var_names


def gene_index(var_names: list[str], genes: list[str], *, file, exact: bool) -> np.ndarray:
    """Column index of each of ``genes`` in ``var_names``; missing genes (or, with ``exact``, extra
    ones) raise :class:`DataError`."""
    pos = {g: i for i, g in enumerate(var_names)}
    missing = [g for g in genes if g not in pos]
    if missing:
        raise DataError(f"{len(missing)} gene(s) of the panel are missing: {missing[:5]}", file=file, field=VAR_FIELD)
    if exact and len(var_names) != len(genes):
        extra = sorted(set(var_names) - set(genes))
        raise DataError(f"{len(extra)} gene(s) not in the panel's gene list: {extra[:5]}; pass a --genes list "
                        f"to select genes", file=file, field=VAR_FIELD)
    return np.array([pos[g] for g in genes], dtype=np.int64)


#  Whole-slide images and patches


class TiffRegions:
    """Region reads from a compressed or tiled TIFF's full-resolution level (tifffile + zarr), without
    loading the whole level; ``close()`` when done."""

    def __init__(self, path: str | Path):
        import tifffile
        import zarr

        self._tif = tifffile.TiffFile(path)
        try:
            self._array = zarr.open(self._tif.series[0].levels[0].aszarr(), mode="r")
            self.shape = tuple(self._array.shape)
            self.dtype = np.dtype(self._array.dtype)
            self.ndim = len(self.shape)
            self[:1, :1]  # decode one tile now: a missing codec fails here, not mid-import
        except BaseException:
            self._tif.close()
            raise

    def __getitem__(self, key):
        return np.asarray(self._array[key])

    def close(self) -> None:
        self._tif.close()


def _read_tiff(path: Path):
    import tifffile

    try:
        return tifffile.memmap(path, mode="r")
    except ValueError:  # not memory-mappable (compressed, tiled)
        pass
    try:
        return TiffRegions(path)
    except ImportError:  # no zarr: read the whole full-resolution level
        with tifffile.TiffFile(path) as tif:
            return tif.series[0].levels[0].asarray()


def open_wsi(path: str | Path):
    """A whole-slide image as an ``(H, W[, C])`` uint8 array: memory-mapped for plain TIFFs, read by
    region (:class:`TiffRegions`) for compressed or tiled ones, decoded in memory for PNG/JPEG."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = _read_tiff(path)
        else:
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = None  # whole-slide images are legitimately huge
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"))
    except DataError:
        raise
    except Exception as exc:  # PIL, tifffile and the codecs raise many types for unreadable files
        raise DataError(f"unreadable whole-slide image: {exc}", file=path, field=keys.IMAGE) from exc
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        if isinstance(arr, TiffRegions):
            lazy, arr = arr, arr[:]
            lazy.close()
        arr = np.moveaxis(arr, 0, -1)  # channels first
    if not (arr.ndim == 2 or arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
        _close(arr)
        raise DataError(f"image of shape {arr.shape} is not (H, W) or (H, W, 3|4)", file=path, field=keys.IMAGE)
    if arr.dtype != np.uint8:
        _close(arr)
        raise DataError(f"image pixels are {arr.dtype}; 8-bit RGB expected", file=path, field=keys.IMAGE)
    return arr


def _close(wsi) -> None:
    if isinstance(wsi, TiffRegions):
        wsi.close()


def patch_box(x: float, y: float, side: float) -> tuple[float, float, float, float]:
    """``(left, top, right, bottom)`` of a square of ``side`` pixels centred on ``(x, y)``."""
    half = side / 2.0
    return x - half, y - half, x + half, y + half


def inside(box: tuple[float, float, float, float], width: int, height: int) -> bool:
    return box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height


def cut_patch(wsi: np.ndarray, box: tuple[float, float, float, float], patch_px: int) -> np.ndarray:
    """Resample the (sub-pixel) ``box`` of ``wsi`` to ``patch_px`` x ``patch_px`` RGB (Lanczos, antialiased)."""
    from PIL import Image

    height, width = wsi.shape[:2]
    scale = max(1.0, (box[2] - box[0]) / patch_px)
    margin = math.ceil(3 * scale) + 1  # the filter's support around the box
    ix0, iy0 = max(0, math.floor(box[0]) - margin), max(0, math.floor(box[1]) - margin)
    ix1, iy1 = min(width, math.ceil(box[2]) + margin), min(height, math.ceil(box[3]) + margin)
    region = np.asarray(wsi[iy0:iy1, ix0:ix1])  # works on arrays, memory maps and TiffRegions
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=2)
    elif region.shape[-1] == 1:
        region = np.repeat(region, 3, axis=2)
    img = Image.fromarray(np.ascontiguousarray(region[..., :3]), "RGB")
    out = img.resize((patch_px, patch_px), Image.Resampling.LANCZOS,
                     box=(box[0] - ix0, box[1] - iy0, box[2] - ix0, box[3] - iy0))
    return np.asarray(out)


#  Splits


def assign_splits(donors: dict[str, str], *, test_samples=(), val_samples=(), seed: int = 0,
                  test_fraction: float = 0.2, val_fraction: float = 0.2,
                  file=None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Split samples by donor.

    Parameters
    ----------
    donors
        ``sample id -> donor``.
    test_samples, val_samples
        Samples named for test / val. The other samples of their donors follow them (to test when
        a donor has samples named for both), so no donor is shared with train.
    seed, test_fraction, val_fraction
        The remaining donors are shuffled with ``seed``; a split not filled by named samples gets
        ``max(1, round(fraction * n_donors))`` donors; at least one donor stays for train.

    Returns
    -------
    ``(splits, moved)``: ``split -> sample ids`` (sorted) and the samples that followed their donor.
    """
    test_samples, val_samples = list(dict.fromkeys(test_samples)), list(dict.fromkeys(val_samples))
    unknown = [s for s in test_samples + val_samples if s not in donors]
    if unknown:
        raise ConfigError(f"unknown sample(s) {unknown}; known samples: {', '.join(sorted(donors))}")
    both = sorted(set(test_samples) & set(val_samples))
    if both:
        raise ConfigError(f"sample(s) {both} named for both test and val")
    split_of = {s: "test" for s in test_samples} | {s: "val" for s in val_samples}
    donor_split: dict[str, str] = {}
    for sid, split in split_of.items():
        d = donors[sid]
        donor_split[d] = "test" if "test" in (donor_split.get(d), split) else split
    named_donors = set(donor_split)
    all_donors = sorted(set(donors.values()))
    remaining = [d for d in all_donors if d not in donor_split]
    n = len(all_donors)
    n_test = 0 if "test" in donor_split.values() else max(1, round(test_fraction * n))
    n_val = 0 if "val" in donor_split.values() else max(1, round(val_fraction * n))
    while n_test + n_val >= len(remaining) and max(n_test, n_val) > 1:
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    if n_test + n_val >= len(remaining):
        named = "" if split_of else "; name held-out samples with --test-samples / --val-samples"
        raise DataError(f"cannot split {n} donor(s) {all_donors} by donor into train, val and test "
                        f"(every split needs its own donor{', beyond the named samples' if split_of else ''}){named}",
                        file=file, field="patient")
    order = [str(d) for d in np.random.default_rng(seed).permutation(np.array(remaining, dtype=object))]
    for d in order[:n_test]:
        donor_split[d] = "test"
    for d in order[n_test:n_test + n_val]:
        donor_split[d] = "val"
    moved = {}
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for sid in sorted(donors):
        split = split_of.get(sid)
        if split is None:
            split = donor_split.get(donors[sid], "train")
            if donors[sid] in named_donors:
                moved[sid] = split
        out[split].append(sid)
    empty = [s for s in SPLITS if not out[s]]
    if empty:
        raise DataError(f"split(s) {empty} would be empty", file=file, field="patient")
    return out, moved


#  The import


def import_hest(src: str | Path, out_dir: str | Path, *, config: HestImportConfig | None = None,
                name: str | None = None, genes_file: str | Path | None = None, test_samples=(),
                val_samples=(), overwrite: bool = False) -> HestImportReport:
    """Cut fixed-µm patches around every spot of a HEST-style directory and write a curated panel.

    Parameters
    ----------
    src
        HEST-style directory (``st/``, ``wsis/``, ``metadata/``).
    out_dir
        Curated panel directory to write (atomically; nothing is left behind on error).
    config
        Patch size in µm and px, split seed and fractions.
    name
        Panel name (default: the name of ``src``).
    genes_file
        Gene list fixing the genes and their order (default: the first sample's ``var_names``; the
        other samples must hold the same genes, in any order).
    test_samples, val_samples
        Samples named for test / val (see :func:`assign_splits`).
    """
    src, out_dir = Path(src), Path(out_dir)
    config = config or HestImportConfig()
    config.check()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    samples = find_samples(src)
    donors = {s.sample_id: s.donor for s in samples}
    splits, moved = assign_splits(donors, test_samples=test_samples, val_samples=val_samples, seed=config.seed,
                                  test_fraction=config.test_fraction, val_fraction=config.val_fraction, file=src)

    genes, ensembl, exact = None, None, True
    if genes_file is not None:
        genes, ensembl = read_gene_file(genes_file)
        if ensembl is not None and not any(ensembl):
            ensembl = None
        exact = False

    obs_parts, count_parts, images = [], [], []
    kept, dropped, inputs = {}, {}, {}
    for sample in samples:
        log.info("sample %s: %s", sample.sample_id, sample.st.name)
        adata, xy, var_names = _read_st(sample)
        if genes is None:
            genes = var_names
        cols = gene_index(var_names, genes, file=sample.st, exact=exact)
        counts = check_counts(adata.X, file=sample.st, obs_names=list(adata.obs_names))
        wsi = open_wsi(sample.wsi)
        try:
            height, width = wsi.shape[:2]
            side = config.patch_um / sample.pixel_size_um
            boxes = [patch_box(x, y, side) for x, y in xy]
            keep = np.array([inside(b, width, height) for b in boxes], dtype=bool)
            n_keep = int(keep.sum())
            dropped[sample.sample_id] = int((~keep).sum())
            if n_keep == 0:
                raise DataError(f"all {len(keep)} spots' {config.patch_um:g} µm patches leave the {width}x{height} "
                                f"px image (spot coordinates not in full-resolution pixels?)", file=sample.wsi,
                                field=keys.IMAGE)
            index = np.flatnonzero(keep)
            count_parts.append(counts[index][:, cols])
            for i in index:
                try:
                    patch = cut_patch(wsi, boxes[i], config.patch_px)
                except Exception as exc:  # a corrupt tile or a missing codec of a region-read TIFF
                    raise DataError(f"cannot read the patch of obs row {i}: {exc}", file=sample.wsi, record=int(i),
                                    field=keys.IMAGE) from exc
                images.append(encode_png(patch))
        finally:
            _close(wsi)
        obs_parts.append(pd.DataFrame({
            keys.SAMPLE: sample.sample_id,
            keys.DONOR: sample.donor,
            keys.TISSUE: sample.tissue,
            keys.SOURCE: SOURCE,
            keys.X: xy[index, 0],
            keys.Y: xy[index, 1],
        }))
        kept[sample.sample_id] = n_keep
        inputs[sample.sample_id] = {
            kind: {"path": str(path.relative_to(src)), "sha256": sha256_file(path)}
            for kind, path in (("st", sample.st), ("wsi", sample.wsi), ("metadata", sample.metadata_file))
        }
        del adata, wsi, counts
        log.info("sample %s: %d spots kept, %d dropped (patch outside the image)", sample.sample_id, n_keep,
                 dropped[sample.sample_id])

    obs = pd.concat(obs_parts, ignore_index=True)
    provenance = {
        "source": SOURCE,
        "src": str(src),
        "params": {"patch_um": config.patch_um, "patch_px": config.patch_px, "seed": config.seed,
                   "test_fraction": config.test_fraction, "val_fraction": config.val_fraction,
                   "test_samples": list(test_samples), "val_samples": list(val_samples)},
        "genes_from": "first sample" if genes_file is None else Path(genes_file).name,
        "slide_pixel_size_um": {s.sample_id: s.pixel_size_um for s in samples},
        "spots_kept": kept,
        "dropped_outside_image": dropped,
        "donors": donors,
        "inputs": inputs,
    }
    if genes_file is not None:
        provenance["genes_file"] = {"path": Path(genes_file).name, "sha256": sha256_file(genes_file)}
    meta = PanelMeta(name=name or src.resolve().name, genes=list(genes), ensembl_ids=ensembl, splits=splits,
                     patch_size_px=config.patch_px, patch_size_um=float(config.patch_um),
                     pixel_size_um=float(config.patch_um) / config.patch_px, provenance=provenance)
    meta = write_panel(Panel(meta=meta, obs=obs, counts=np.concatenate(count_parts), images=images), out_dir,
                       overwrite=overwrite)
    return HestImportReport(meta=meta, out_dir=out_dir, spots_per_sample=kept, dropped_outside_image=dropped,
                            donors=donors, splits=splits, moved_with_donor=moved)
