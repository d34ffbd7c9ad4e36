"""Import of a HEST-style directory (issue 2, item 4), on a tiny directory built by
``fixtures_builders.write_hest_dir``: four slides at 0.25 / 0.5 / 0.4 / 0.3125 µm/px (three PNG, one
TIFF), three donors, a dark 40 µm square at one spot of every slide."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures_builders import DEFAULT_HEST_SAMPLES, write_hest_dir

from hescape.cli import main
from hescape.data import keys
from hescape.data.hest_import import HestImportConfig, assign_splits, import_hest
from hescape.data.panel import validate_panel
from hescape.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def hest(tmp_path_factory):
    return write_hest_dir(tmp_path_factory.mktemp("hest") / "my-hest")


def assert_nothing_written(out):
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def square_extent(patch: np.ndarray) -> tuple[int, int, float, float]:
    """Width and height (px) of the dark square in a patch, and its centre."""
    rows, cols = np.nonzero(patch.astype(int).sum(-1) < 300)
    return (cols.max() - cols.min() + 1, rows.max() - rows.min() + 1,
            (cols.min() + cols.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2)


@pytest.mark.parametrize(("patch_um", "patch_px"), [(112.0, 224), (60.0, 48)])
def test_same_field_of_view_across_pixel_sizes(hest, tmp_path, patch_um, patch_px):
    out = tmp_path / "panel"
    report = import_hest(hest.src, out, config=HestImportConfig(patch_um=patch_um, patch_px=patch_px))
    panel, validation = validate_panel(out)
    meta = panel.meta
    assert validation.ok and not validation.warnings
    assert meta.name == "my-hest" and meta.genes == hest.genes
    assert (meta.patch_size_px, meta.patch_size_um, meta.pixel_size_um) == (patch_px, patch_um, patch_um / patch_px)
    images = panel.decode_images()
    assert images.shape[1:] == (patch_px, patch_px, 3)
    expected_side = hest.square_um / patch_um * patch_px  # 80 px and 32 px
    for spec in DEFAULT_HEST_SAMPLES:
        kept = hest.expected_kept(spec.sid, patch_um)
        rows = np.flatnonzero((panel.obs[keys.SAMPLE] == spec.sid).to_numpy())
        assert report.spots_per_sample[spec.sid] == kept.sum() == len(rows)
        assert report.dropped_outside_image[spec.sid] == (~kept).sum() > 0
        assert meta.provenance["dropped_outside_image"][spec.sid] == (~kept).sum()
        assert meta.provenance["slide_pixel_size_um"][spec.sid] == spec.pixel_size_um
        # Counts of the kept spots, in the panel's gene order (one slide has its genes shuffled).
        np.testing.assert_array_equal(panel.counts[rows], hest.counts[spec.sid][kept])
        # x/y are the full-resolution pixel coordinates of the spot centres.
        xy = panel.obs.loc[rows, [keys.X, keys.Y]].to_numpy()
        np.testing.assert_allclose(xy, hest.coords_um[kept] / spec.pixel_size_um)
        # The 40 µm square has the same size and position in every slide's patch.
        at = rows[int(np.flatnonzero(np.flatnonzero(kept) == hest.square_spot)[0])]
        width, height, cx, cy = square_extent(images[at])
        assert abs(width - expected_side) <= 1 and abs(height - expected_side) <= 1, (spec.sid, width, height)
        assert abs(cx - patch_px / 2) <= 0.5 and abs(cy - patch_px / 2) <= 0.5
    assert set(panel.obs[keys.SOURCE]) == {"hest"} and set(panel.obs[keys.TISSUE]) == {"breast"}


def test_open_wsi_tiff_variants(tmp_path):
    import tifffile

    from hescape.data.hest_import import TiffRegions, open_wsi

    image = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    variants = {
        "plain": ({}, np.memmap),
        "planar": ({"planarconfig": "separate"}, np.memmap),
        "zlib-tiled": ({"compression": "zlib", "tile": (32, 32)}, TiffRegions),
    }
    for name, (options, kind) in variants.items():
        path = tmp_path / f"{name}.tif"
        data = np.moveaxis(image, -1, 0) if name == "planar" else image
        tifffile.imwrite(path, data, photometric="rgb", **options)
        wsi = open_wsi(path)
        assert isinstance(wsi, kind), name
        np.testing.assert_array_equal(np.asarray(wsi[5:40, 7:60]), image[5:40, 7:60])
        if isinstance(wsi, TiffRegions):
            wsi.close()


def test_default_split_is_by_donor_and_seeded(hest, tmp_path):
    out = tmp_path / "panel"
    report = import_hest(hest.src, out, config=HestImportConfig(patch_px=32))
    panel, _ = validate_panel(out)
    donors = panel.obs.groupby(keys.SAMPLE)[keys.DONOR].first().to_dict()
    assert donors == {"S1": "patient 1 [Study A]", "S2": "patient 1 [Study A]", "S3": "patient 2 [Study A]",
                      "S4": "S4"}
    by_split = {s: {donors[sid] for sid in panel.meta.splits[s]} for s in ("train", "val", "test")}
    assert all(len(d) == 1 for d in by_split.values())  # 3 donors: one each
    assert len(set.union(*by_split.values())) == 3
    assert report.splits == panel.meta.splits
    again, _ = assign_splits(donors, seed=0)
    assert again == panel.meta.splits
    seen = {json.dumps(assign_splits(donors, seed=s)[0], sort_keys=True) for s in range(12)}
    assert len(seen) > 1  # the seed matters


def test_named_samples_and_donor_followers(tmp_path):
    donors = {"S1": "p1", "S2": "p1", "S3": "p2", "S4": "S4", "S5": "p5"}
    splits, moved = assign_splits(donors, test_samples=["S3"], val_samples=["S4"])
    assert splits == {"train": ["S1", "S2", "S5"], "val": ["S4"], "test": ["S3"]} and moved == {}
    splits, moved = assign_splits(donors, test_samples=["S1"], seed=3)
    assert "S2" in splits["test"] and moved == {"S2": "test"}
    assert len(splits["val"]) == 1 and donors[splits["val"][0]] not in {"p1"}
    with pytest.raises(ConfigError, match="known samples: S1, S2"):
        assign_splits(donors, test_samples=["S9"])
    with pytest.raises(ConfigError, match="both test and val"):
        assign_splits(donors, test_samples=["S3"], val_samples=["S3"])
    with pytest.raises(DataError, match="--test-samples") as err:
        assign_splits({"A": "p1", "B": "p1", "C": "p2"}, file="src")
    assert err.value.field == "patient" and err.value.file == "src"
    two = {"A": "p1", "B": "p2"}
    with pytest.raises(DataError, match="cannot split 2 donor"):
        assign_splits(two, test_samples=["A"], val_samples=["B"])


def test_cli_named_samples(hest, tmp_path, capsys):
    out = tmp_path / "panel"
    argv = ["import-hest", "--src", str(hest.src), "--out", str(out), "--name", "tiny-hest", "--patch-px", "32",
            "--set", "import_hest.patch_um=112", "--test-samples", "S3", "--val-samples", "S4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "spots dropped (patch outside the image): 60" in printed
    panel, _ = validate_panel(out)
    assert panel.meta.name == "tiny-hest" and panel.meta.patch_size_px == 32 and panel.meta.patch_size_um == 112
    assert panel.meta.splits == {"train": ["S1", "S2"], "val": ["S4"], "test": ["S3"]}
    assert main(argv) == 2  # output exists
    assert main([*argv[:4], str(tmp_path / "other"), "--test-samples", "S9"]) == 2
    assert "known samples" in capsys.readouterr().err
    assert main([*argv[:4], str(tmp_path / "other"), "--set", "import_hest.patch_um=-1"]) == 2
    assert "patch_um" in capsys.readouterr().err


def _drop_metadata(root):
    (root / "metadata" / "S2.json").unlink()
    return root / "metadata" / "S2.json", None, None


def _no_pixel_size(root):
    path = root / "metadata" / "S2.json"
    meta = json.loads(path.read_text())
    del meta["pixel_size_um_estimated"]
    path.write_text(json.dumps(meta))
    return path, None, "pixel_size_um_estimated"


def _negative_pixel_size(root):
    path = root / "metadata" / "S3.json"
    meta = json.loads(path.read_text())
    meta["pixel_size_um_estimated"] = -0.25
    path.write_text(json.dumps(meta))
    return path, None, "pixel_size_um_estimated"


def _rewrite_h5ad(root, sid, change):
    import anndata as ad

    path = root / "st" / f"{sid}.h5ad"
    adata = ad.read_h5ad(path)
    adata = change(adata) or adata
    adata.write_h5ad(path)
    return path


def _non_integer_counts(root):
    def change(adata):
        X = np.asarray(adata.X, dtype=np.float32)
        X[7, 2] = 1.5
        adata.X = X

    return _rewrite_h5ad(root, "S3", change), 7, "X"


def _negative_counts(root):
    def change(adata):
        X = adata.X.tolil() if hasattr(adata.X, "tolil") else adata.X
        X[4, 0] = -1
        adata.X = X.tocsr() if hasattr(X, "tocsr") else X

    return _rewrite_h5ad(root, "S1", change), 4, "X"


def _gene_mismatch(root):
    def change(adata):
        adata.var_names = ["OTHER" if g == "G5" else g for g in adata.var_names]

    return _rewrite_h5ad(root, "S2", change), None, "var_names"


def _unreadable_wsi(root):
    path = root / "wsis" / "S4.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return path, None, keys.IMAGE


def _unreadable_tiff(root):
    path = root / "wsis" / "S3.tif"
    path.write_bytes(b"II*\x00 garbage")
    return path, None, keys.IMAGE


def _missing_wsi(root):
    (root / "wsis" / "S2.png").unlink()
    return root / "wsis", None, None


BAD = {
    "missing wsi": _missing_wsi,
    "missing metadata file": _drop_metadata,
    "missing pixel size": _no_pixel_size,
    "negative pixel size": _negative_pixel_size,
    "non-integer counts": _non_integer_counts,
    "negative counts": _negative_counts,
    "gene mismatch": _gene_mismatch,
    "unreadable png": _unreadable_wsi,
    "unreadable tiff": _unreadable_tiff,
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_name_file_and_field(tmp_path, case):
    small = write_hest_dir(tmp_path / "src", width_um=300.0, height_um=200.0, square_at_um=(100.0, 100.0))
    file, record, fieldname = BAD[case](small.src)
    out = tmp_path / "panel"
    with pytest.raises(DataError) as err:
        import_hest(small.src, out, config=HestImportConfig(patch_px=16))
    assert err.value.file == str(file), str(err.value)
    assert err.value.record == record and err.value.field == fieldname, str(err.value)
    assert_nothing_written(out)


def test_genes_file_orders_and_selects(hest, tmp_path):
    genes = tmp_path / "genes.txt"
    genes.write_text("G3\nG0\nG7\n")
    out = tmp_path / "panel"
    import_hest(hest.src, out, genes_file=genes, config=HestImportConfig(patch_px=16),
                test_samples=["S3"], val_samples=["S4"])
    panel, _ = validate_panel(out)
    assert panel.meta.genes == ["G3", "G0", "G7"]
    rows = (panel.obs[keys.SAMPLE] == "S2").to_numpy()
    np.testing.assert_array_equal(panel.counts[rows], hest.counts["S2"][hest.expected_kept("S2", 112.0)][:, [3, 0, 7]])
    missing = tmp_path / "missing.txt"
    missing.write_text("G3\nNOPE\n")
    with pytest.raises(DataError, match="NOPE") as err:
        import_hest(hest.src, tmp_path / "p2", genes_file=missing, test_samples=["S3"], val_samples=["S4"])
    assert err.value.field == "var_names"
    assert_nothing_written(tmp_path / "p2")
