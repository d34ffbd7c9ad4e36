"""Builders of the importers' test inputs, in exactly the layouts the importers read.

- :func:`write_hf_download`: a small fake download of the Hugging Face dataset
  ``Peng-AI/hescape-pyarrow`` (``<root>/<config>/train-0000i-of-0000N.parquet``; ClassLabel integer
  columns with their names in the schema's ``huggingface`` features metadata; ``image`` as a struct
  of PNG bytes and path; ``gexp`` as ``list<list<int64>>`` of shape (1, G); HEST metadata strings).
- :func:`write_hest_dir`: a tiny HEST-style directory (``st/<id>.h5ad``, ``wsis/<id>.<png|tif>``,
  ``metadata/<id>.json``) with synthetic slides at different µm/px and a dark square of known
  physical size drawn at one spot of every slide.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

HEST_META_COLUMNS = (
    "atlas", "age", "diagnosis", "cancer", "oncotree_code", "tumor_grade", "gender", "race", "treatment_type",
    "therapeutic_agents", "tumor_tissue_type", "assay", "preservation_method", "stain", "spaceranger", "species",
    "cytassist",
)


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def gene_file(tmp_path: Path, panel: str, n_genes: int, *, length: int | None = None) -> Path:
    """The panel's real gene list from ../shared/reference when present and ``length`` is not
    changed, else a synthetic one (``length`` symbols, default ``n_genes``)."""
    real = REFERENCE / "hescape" / "panels" / f"{panel}.genes.tsv"
    if length is None and real.is_file():
        return real
    path = tmp_path / f"{panel}.genes.{length or n_genes}.tsv"
    rows = ["symbol\tensembl_id"] + [f"GENE{i:04d}\tENSG{i:011d}" for i in range(length or n_genes)]
    path.write_text("\n".join(rows) + "\n")
    return path


#  Hugging Face download


@dataclass
class HFDownload:
    """What :func:`write_hf_download` wrote and what an import must make of it."""

    src: Path
    files: list[Path]
    name_classes: list[str]
    kept_counts: dict[str, np.ndarray]  # sample -> (n, G) counts of the records that must be kept
    kept_images: dict[str, list[bytes]]
    dropped_by_filter: dict[str, int]
    dropped_not_in_splits: dict[str, int]
    shards: list[list[dict]] = field(default_factory=list)


def _features(name_classes, source_classes, tissue_classes, n_genes: int) -> dict:
    feats = {
        "name": {"names": list(name_classes), "_type": "ClassLabel"},
        "image": {"_type": "Image"},
        "gexp": {"shape": [1, n_genes], "dtype": "int64", "_type": "Array2D"},
        "source": {"names": list(source_classes), "_type": "ClassLabel"},
        "tissue": {"names": list(tissue_classes), "_type": "ClassLabel"},
        "cell_coords": {"feature": {"dtype": "float64", "_type": "Value"}, "_type": "Sequence"},
    }
    feats.update({c: {"dtype": "string", "_type": "Value"} for c in HEST_META_COLUMNS})
    return feats


def _schema(features: dict, columns: list[str]) -> pa.Schema:
    types = {
        "name": pa.int64(),
        "image": pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        "gexp": pa.list_(pa.list_(pa.int64())),
        "source": pa.int64(),
        "tissue": pa.int64(),
        "cell_coords": pa.list_(pa.float64()),
    }
    fields = [pa.field(c, types.get(c, pa.string())) for c in columns]
    info = {"info": {"features": {c: features[c] for c in columns}}}
    return pa.schema(fields, metadata={b"huggingface": json.dumps(info).encode()})


def write_hf_download(root: Path, spec, *, n_per_sample: int = 3, n_shards: int = 2, patch_px: int = 16,
                      layout: str = "config", extra_sample: str = "TENX_NOT_IN_SPLITS", n_filtered: int = 2,
                      mutate: Callable[[list[list[dict]]], None] | None = None, drop_columns=(),
                      seed: int = 0) -> HFDownload:
    """Write a fake ``Peng-AI/hescape-pyarrow`` download of panel ``spec`` (a registry PanelSpec).

    Every split sample gets ``n_per_sample`` records passing the panel's filter; the first train
    sample also gets ``n_filtered`` records failing it; ``extra_sample`` (in no split) gets
    ``n_per_sample`` records passing it. Records are ordered by sample and cut into ``n_shards``
    shards. ``mutate(shards)`` may change the rows (dicts of stored values; the key ``"_kept"``
    says whether the import must keep the record) before they are written.

    ``layout``: ``"config"`` -> ``root/<panel>/train-*.parquet``, ``"data"`` ->
    ``root/data/<panel>/...``, ``"flat"`` -> ``root/train-*.parquet``.
    """
    rng = np.random.default_rng(seed)
    n_genes = spec.n_genes
    split_samples = list(dict.fromkeys(sid for s in ("train", "val", "test") for sid in spec.splits[s]))
    # ClassLabel names in a scrambled order, so that decoding by position is actually tested.
    name_classes = sorted(split_samples + [extra_sample], reverse=True)
    filt_col, filt_val = spec.filter_column, spec.filter_values[0]
    source_classes = ["other_source", filt_val.upper() if filt_col == "source" else "hest"]
    tissue_classes = ["kidney", filt_val.capitalize() if filt_col == "tissue" else "breast"]
    passing = {"source": 1, "tissue": 1}
    failing = dict(passing, **{filt_col: 0})

    rows, kept_counts, kept_images = [], {}, {}
    plan = [(sid, passing, True) for sid in split_samples for _ in range(n_per_sample)]
    plan[n_per_sample:n_per_sample] = [(split_samples[0], failing, False)] * n_filtered
    plan += [(extra_sample, passing, False)] * n_per_sample
    for i, (sid, labels, kept) in enumerate(plan):
        counts = rng.poisson(2.0, n_genes).astype(np.int64)
        image = png_bytes(rng.integers(0, 256, (patch_px, patch_px, 3)))
        row = {
            "name": name_classes.index(sid),
            "image": {"bytes": image, "path": f"{sid}_{i}.png"},
            "gexp": [counts.tolist()],
            "source": labels["source"],
            "tissue": labels["tissue"],
            "cell_coords": [float(10 * i), float(5 * i)],
            "_kept": kept,
            "_sample": sid,
        }
        row.update({c: f"{c}-{sid}" for c in HEST_META_COLUMNS})
        rows.append(row)
        if kept:
            kept_counts.setdefault(sid, []).append(counts)
            kept_images.setdefault(sid, []).append(image)
    shards = [list(part) for part in np.array_split(np.array(rows, dtype=object), n_shards)]
    if mutate is not None:
        mutate(shards)

    features = _features(name_classes, source_classes, tissue_classes, n_genes)
    columns = [c for c in ["name", "image", "gexp", "source", "tissue", "cell_coords", *HEST_META_COLUMNS]
               if c not in drop_columns]
    schema = _schema(features, columns)
    directory = {"config": root / spec.name, "data": root / "data" / spec.name, "flat": root}[layout]
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for k, shard in enumerate(shards):
        path = directory / f"train-{k:05d}-of-{n_shards:05d}.parquet"
        table = pa.Table.from_pylist([{c: r[c] for c in columns} for r in shard], schema=schema)
        pq.write_table(table, path)
        files.append(path)
    dropped_filter = {split_samples[0]: n_filtered} if n_filtered else {}
    return HFDownload(
        src=root, files=files, name_classes=name_classes,
        kept_counts={k: np.stack(v) for k, v in kept_counts.items()}, kept_images=kept_images,
        dropped_by_filter=dropped_filter, dropped_not_in_splits={extra_sample: n_per_sample}, shards=shards,
    )


#  HEST-style directory


@dataclass
class HestSampleSpec:
    sid: str
    pixel_size_um: float
    patient: str | None = None
    study: str | None = None
    ext: str = "png"
    sparse: bool = False
    shuffle_genes: bool = False
    float_counts: bool = False
    width_um: float | None = None  # physical width of the slide (default: the directory's)
    tiff_compression: str | None = None  # e.g. "zlib" (then tiled): read by region, not memory-mapped


DEFAULT_HEST_SAMPLES = (
    HestSampleSpec("S1", 0.25, patient="patient 1", study="Study A", ext="png", sparse=True),
    HestSampleSpec("S2", 0.5, patient="patient 1", study="Study A", ext="png", shuffle_genes=True),
    HestSampleSpec("S3", 0.4, patient="patient 2", study="Study A", ext="tif", float_counts=True,
                   tiff_compression="zlib"),
    HestSampleSpec("S4", 0.3125, patient=None, ext="png", width_um=370.0),
)
BACKGROUND = (236, 200, 222)
SQUARE = (40, 20, 90)


@dataclass
class HestDir:
    src: Path
    genes: list[str]
    samples: tuple[HestSampleSpec, ...]
    counts: dict[str, np.ndarray]  # sample -> (n_spots, G) in ``genes`` order
    coords_um: np.ndarray  # (n_spots, 2) spot centres in µm (the same grid on every slide)
    width_um: float
    height_um: float
    square_spot: int  # index of the spot with the square
    square_um: float

    def expected_kept(self, sid: str, patch_um: float) -> np.ndarray:
        """Spots of ``sid`` whose ``patch_um`` patch lies inside its slide."""
        spec = next(s for s in self.samples if s.sid == sid)
        width = spec.width_um or self.width_um
        half = patch_um / 2
        x, y = self.coords_um[:, 0], self.coords_um[:, 1]
        return (x - half >= 0) & (y - half >= 0) & (x + half <= width) & (y + half <= self.height_um)


def write_hest_dir(root: Path, samples=DEFAULT_HEST_SAMPLES, *, n_genes: int = 12, width_um: float = 450.0,
                   height_um: float = 400.0, step_um: float = 80.0, origin_um: float = 20.0,
                   square_um: float = 40.0, square_at_um=(180.0, 180.0), seed: int = 0) -> HestDir:
    """Write a HEST-style directory; every slide covers the same physical area at its own µm/px."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import tifffile

    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    xs = np.arange(origin_um, width_um, step_um)
    ys = np.arange(origin_um, height_um, step_um)
    coords_um = np.array([(x, y) for y in ys for x in xs], dtype=np.float64)
    square_spot = int(np.flatnonzero((coords_um == np.asarray(square_at_um)).all(1))[0])
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    all_counts = {}
    for spec in samples:
        pix = spec.pixel_size_um
        width, height = round((spec.width_um or width_um) / pix), round(height_um / pix)
        wsi = np.empty((height, width, 3), dtype=np.uint8)
        wsi[:] = BACKGROUND
        # The square covers [c - L/2, c + L/2) in continuous pixel coordinates.
        cx, cy = square_at_um[0] / pix, square_at_um[1] / pix
        half = square_um / pix / 2
        cols = (np.arange(width) + 0.5 >= cx - half) & (np.arange(width) + 0.5 < cx + half)
        rows = (np.arange(height) + 0.5 >= cy - half) & (np.arange(height) + 0.5 < cy + half)
        wsi[np.ix_(rows, cols)] = SQUARE
        if spec.ext in ("tif", "tiff"):
            tiles = {"tile": (256, 256)} if spec.tiff_compression else {}
            tifffile.imwrite(root / "wsis" / f"{spec.sid}.{spec.ext}", wsi, photometric="rgb",
                             compression=spec.tiff_compression, **tiles)
        else:
            from PIL import Image

            Image.fromarray(wsi).save(root / "wsis" / f"{spec.sid}.{spec.ext}", compress_level=1)

        counts = rng.poisson(3.0, (len(coords_um), n_genes)).astype(np.int64)
        all_counts[spec.sid] = counts.astype(np.int32)
        order = rng.permutation(n_genes) if spec.shuffle_genes else np.arange(n_genes)
        X = counts[:, order]
        X = X.astype(np.float32) if spec.float_counts else X
        X = sp.csr_matrix(X) if spec.sparse else X
        adata = ad.AnnData(
            X=X,
            obs=pd.DataFrame(index=[f"{spec.sid}_spot{i}" for i in range(len(coords_um))]),
            var=pd.DataFrame(index=[genes[j] for j in order]),
            obsm={"spatial": coords_um / pix},
        )
        adata.write_h5ad(root / "st" / f"{spec.sid}.h5ad")
        meta = {"id": spec.sid, "pixel_size_um_estimated": pix, "organ": "Breast", "tissue": "breast",
                "spot_diameter": 55.0}
        if spec.patient is not None:
            meta["patient"] = spec.patient
        if spec.study is not None:
            meta["dataset_title"] = spec.study
        (root / "metadata" / f"{spec.sid}.json").write_text(json.dumps(meta))
    return HestDir(src=root, genes=genes, samples=tuple(samples), counts=all_counts, coords_um=coords_um,
                   width_um=width_um, height_um=height_um, square_spot=square_spot, square_um=square_um)
