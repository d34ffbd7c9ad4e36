"""Import of a Peng-AI/hescape-pyarrow download (issue 2, item 3), on a fake download built by
``fixtures_builders.write_hf_download`` in exactly the dataset's layout."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow.parquet as pq
import pytest
from fixtures_builders import gene_file, write_hf_download

from hescape.cli import main
from hescape.data import keys
from hescape.data.hf_import import PROVENANCE_SOURCE, find_parquet_files, import_hf, resolve_splits
from hescape.data.panel import read_records, validate_panel
from hescape.data.registry import get_panel_spec, read_gene_file
from hescape.errors import DataError, UnknownNameError
from hescape.io import sha256_file

BREAST = "human-breast-panel"


@pytest.fixture
def breast():
    return get_panel_spec(BREAST)


def assert_nothing_written(tmp_path, out):
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


def test_import_end_to_end(tmp_path, breast):
    dl = write_hf_download(tmp_path / "dl", breast, n_per_sample=3, n_shards=3)
    genes = gene_file(tmp_path, BREAST, breast.n_genes)
    out = tmp_path / "panel"
    report = import_hf(dl.src, BREAST, genes, out)

    panel, validation = validate_panel(out)
    assert validation.ok and not validation.warnings
    meta = panel.meta
    symbols, ensembl = read_gene_file(genes)
    assert meta.name == BREAST and meta.genes == symbols and meta.ensembl_ids == ensembl
    assert meta.n_genes == breast.n_genes == 280
    assert meta.splits == breast.splits and meta.split_aliases == {}
    assert meta.patch_size_px == 16 and meta.patch_size_um is None and meta.pixel_size_um is None
    # Every kept record, in order, with its counts and PNG bytes unchanged.
    for sid, counts in dl.kept_counts.items():
        mask = (panel.obs[keys.SAMPLE] == sid).to_numpy()
        np.testing.assert_array_equal(panel.counts[mask], counts)
        assert [panel.images[i] for i in np.flatnonzero(mask)] == dl.kept_images[sid]
    assert sorted(set(panel.obs[keys.SAMPLE])) == sorted(dl.kept_counts)
    # Donors follow the protocol's patients; ClassLabel columns are decoded; metadata kept.
    for sid, donor in panel.obs.groupby(keys.SAMPLE)[keys.DONOR].first().items():
        assert donor == breast.donor_of(sid)
    assert panel.obs.groupby(keys.DONOR)[keys.SAMPLE].nunique().max() == 1
    assert set(panel.obs[keys.TISSUE]) == {"breast"} and set(panel.obs[keys.SOURCE]) == {"HEST"}
    assert (panel.obs["assay"] == "assay-" + panel.obs[keys.SAMPLE]).all()
    # Dropped records are reported and recorded.
    assert report.dropped_by_filter == dl.dropped_by_filter == {"TENX99": 2}
    assert report.dropped_not_in_splits == dl.dropped_not_in_splits
    assert report.n_read == sum(len(s) for s in dl.shards) and report.n_kept == len(panel)
    assert report.spots_per_split == {"train": 9, "val": 3, "test": 3}
    prov = meta.provenance
    assert prov["source"] == PROVENANCE_SOURCE == "hf:Peng-AI/hescape-pyarrow"
    assert [i["sha256"] for i in prov["inputs"]] == [sha256_file(f) for f in dl.files]
    assert [i["path"] for i in prov["inputs"]] == [f"{BREAST}/{f.name}" for f in dl.files]
    assert prov["dropped_by_filter"] == {"TENX99": 2} and prov["genes_file"]["sha256"] == sha256_file(genes)


def test_classlabel_columns_decoded_from_features_metadata(tmp_path, breast):
    dl = write_hf_download(tmp_path / "dl", breast, n_per_sample=2, n_shards=2)
    raw = pq.read_table(dl.files[0], columns=[keys.NAME]).column(keys.NAME).to_pylist()
    assert all(isinstance(v, int) for v in raw)
    rec = read_records(dl.files[0], n_genes=breast.n_genes)
    # The class names are stored in reverse order: decoding must use the features metadata.
    assert rec.obs[keys.SAMPLE].tolist() == [dl.name_classes[i] for i in raw]
    assert rec.obs[keys.SAMPLE].iloc[0] == "TENX99" and raw[0] != 0
    assert rec.counts.shape == (len(raw), 280)


def test_layouts_and_config_choice(tmp_path, breast):
    data = write_hf_download(tmp_path / "a", breast, layout="data")
    assert find_parquet_files(data.src, BREAST) == data.files
    flat = write_hf_download(tmp_path / "b", breast, layout="flat", n_shards=1)
    assert find_parquet_files(flat.src, BREAST) == flat.files
    skin = get_panel_spec("human-skin-panel")
    both = tmp_path / "c"
    want = write_hf_download(both, breast, n_per_sample=1)
    write_hf_download(both, skin, n_per_sample=1)
    assert find_parquet_files(both, BREAST) == want.files
    only_skin = tmp_path / "only_skin"
    write_hf_download(only_skin, skin, n_per_sample=1)
    with pytest.raises(DataError, match="human-skin-panel"):
        find_parquet_files(only_skin, BREAST)


def test_splits_dir_overrides_registry_and_records_pixel_sizes(tmp_path, breast):
    dl = write_hf_download(tmp_path / "dl", breast, n_per_sample=2)
    tables = tmp_path / "splits"
    tables.mkdir()
    rows = {  # TENX94 moves to test; TENX95 and TENX99 share a patient here.
        "train": [("TENX99", "patient 1", "0.2125"), ("TENX95", "patient 1", "0.2125")],
        "val": [("NCBI785", "patient 4", "0.3639")],
        "test": [("NCBI783", "patient 5", "0.2740"), ("TENX94", "", "0.25")],
    }
    for split, entries in rows.items():
        with open(tables / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["dataset_title", "id", "organ", "patient", "pixel_size_um_estimated"])
            w.writerows([["Study", sid, "Breast", patient, px] for sid, patient, px in entries])
    out = tmp_path / "panel"
    import_hf(dl.src, BREAST, gene_file(tmp_path, BREAST, 280), out, splits_dir=tables)
    panel, _ = validate_panel(out)
    assert panel.meta.splits == {"train": ["TENX99", "TENX95"], "val": ["NCBI785"], "test": ["NCBI783", "TENX94"]}
    donors = panel.obs.groupby(keys.SAMPLE)[keys.DONOR].first().to_dict()
    assert donors["TENX99"] == donors["TENX95"] == "patient 1 [Study]" and donors["TENX94"] == "TENX94"
    prov = panel.meta.provenance
    assert prov["pixel_size_um"] == {"TENX99": 0.2125, "TENX95": 0.2125, "NCBI785": 0.3639, "NCBI783": 0.274,
                                     "TENX94": 0.25}
    assert prov["patch_size_um"]["TENX94"] == pytest.approx(0.25 * 16)
    assert panel.meta.pixel_size_um is None


def test_real_split_tables(tmp_path, breast, reference_dir):
    dl = write_hf_download(tmp_path / "dl", breast, n_per_sample=1)
    out = tmp_path / "panel"
    import_hf(dl.src, BREAST, gene_file(tmp_path, BREAST, 280), out,
              splits_dir=reference_dir / "hescape" / "splits" / BREAST)
    panel, report = validate_panel(out)
    assert panel.meta.splits == breast.splits and not report.warnings
    assert panel.meta.provenance["pixel_size_um"]["NCBI785"] == pytest.approx(0.3639107956749145)
    assert {panel.obs.loc[panel.obs[keys.SAMPLE] == s, keys.DONOR].iloc[0] for s in breast.splits["train"]} == {
        breast.donor_of(s) for s in breast.splits["train"]}


def test_skin_panel_aliases_val_to_test(tmp_path):
    skin = get_panel_spec("human-skin-panel")
    assert skin.splits["val"] == skin.splits["test"] == ["TENX117"]
    dl = write_hf_download(tmp_path / "dl", skin, n_per_sample=2)
    out = tmp_path / "panel"
    report = import_hf(dl.src, skin.name, gene_file(tmp_path, skin.name, skin.n_genes), out)
    panel, validation = validate_panel(out)
    meta = panel.meta
    assert meta.splits == {"train": ["TENX115"], "val": [], "test": ["TENX117"]}
    assert meta.split_aliases == {"val": "test"} and meta.samples_of("val") == ["TENX117"]
    assert validation.ok and report.spots_per_split == {"train": 2, "val": 2, "test": 2}
    # The filter is on tissue here, case-insensitively ("Skin" in the data, "skin" in the registry).
    assert set(panel.obs[keys.TISSUE]) == {"Skin"} and report.dropped_by_filter == {"TENX115": 2}


def test_resolve_splits_rejects_other_overlaps():
    with pytest.raises(DataError, match="both train and test"):
        resolve_splits({"train": ["A"], "val": ["B"], "test": ["A"]}, file="x")


def _mutate_kept(shard: int, column: str, value, which: int = 0):
    """A ``mutate`` that sets ``column`` of the ``which``-th kept record of ``shard``; returns it and
    the record's row number in the file (filled in when applied)."""
    where = {}

    def mutate(shards):
        rows = [i for i, r in enumerate(shards[shard]) if r["_kept"]]
        where["row"] = rows[which]
        shards[shard][rows[which]][column] = value(shards[shard][rows[which]]) if callable(value) else value

    return mutate, where


BAD_CASES = {
    "classlabel out of range": ("name", lambda r: 99),
    "gexp wrong length": ("gexp", lambda r: [r["gexp"][0][:-1]]),
    "undecodable image": ("image", lambda r: {"bytes": b"\x89PNG\r\n\x1a\n not really", "path": "x.png"}),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_names_file_record_field(tmp_path, breast, case):
    column, value = BAD_CASES[case]
    mutate, where = _mutate_kept(1, column, value, which=1)
    dl = write_hf_download(tmp_path / "dl", breast, mutate=mutate)
    out = tmp_path / "panel"
    with pytest.raises(DataError) as err:
        import_hf(dl.src, BREAST, gene_file(tmp_path, BREAST, 280), out)
    assert err.value.file == str(dl.files[1]) and err.value.record == where["row"] and err.value.field == column
    assert_nothing_written(tmp_path, out)


def test_gene_file_length_mismatch(tmp_path, breast):
    dl = write_hf_download(tmp_path / "dl", breast, n_per_sample=1)
    genes = gene_file(tmp_path, BREAST, 280, length=279)
    out = tmp_path / "panel"
    with pytest.raises(DataError, match="279 symbols") as err:
        import_hf(dl.src, BREAST, genes, out)
    assert err.value.file == str(genes) and err.value.field == "symbol"
    assert_nothing_written(tmp_path, out)


def test_missing_column(tmp_path, breast):
    dl = write_hf_download(tmp_path / "dl", breast, n_per_sample=1, drop_columns=("tissue",))
    out = tmp_path / "panel"
    with pytest.raises(DataError, match="missing column") as err:
        import_hf(dl.src, BREAST, gene_file(tmp_path, BREAST, 280), out)
    assert err.value.file == str(dl.files[0]) and err.value.field == "tissue"
    assert_nothing_written(tmp_path, out)


def test_wrong_panel_for_download(tmp_path, breast):
    dl = write_hf_download(tmp_path / "dl", breast, n_per_sample=1, layout="flat")
    out = tmp_path / "panel"
    with pytest.raises(DataError, match="322 genes") as err:
        import_hf(dl.src, "human-colon-panel", gene_file(tmp_path, "human-colon-panel", 322), out)
    assert err.value.file == str(dl.files[0]) and err.value.field == keys.GEXP
    assert_nothing_written(tmp_path, out)


def test_unknown_panel_lists_known_names(tmp_path, breast):
    dl = write_hf_download(tmp_path / "dl", breast, n_per_sample=1)
    with pytest.raises(UnknownNameError, match="human-breast-panel") as err:
        import_hf(dl.src, "human-brest-panel", gene_file(tmp_path, BREAST, 280), tmp_path / "panel")
    assert "human-skin-panel" in str(err.value)
    assert not (tmp_path / "panel").exists()


def test_missing_split_sample(tmp_path, breast):
    def drop_tenx95(shards):
        for shard in shards:
            shard[:] = [r for r in shard if r["_sample"] != "TENX95"]

    dl = write_hf_download(tmp_path / "dl", breast, n_per_sample=2, mutate=drop_tenx95)
    genes = gene_file(tmp_path, BREAST, 280)
    out = tmp_path / "panel"
    with pytest.raises(DataError, match="TENX95") as err:
        import_hf(dl.src, BREAST, genes, out)
    assert err.value.field == keys.NAME
    assert_nothing_written(tmp_path, out)
    report = import_hf(dl.src, BREAST, genes, out, allow_missing=True)
    assert report.missing_samples == ["TENX95"] and report.meta.splits["train"] == ["TENX99", "TENX94"]
    validate_panel(out)


def test_cli(tmp_path, breast, capsys):
    dl = write_hf_download(tmp_path / "dl", breast, n_per_sample=1)
    out = tmp_path / "panel"
    args = ["import-hf", "--src", str(dl.src), "--panel", BREAST, "--out", str(out)]
    bad = gene_file(tmp_path, BREAST, 280, length=281)
    assert main([*args, "--genes", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert_nothing_written(tmp_path, out)
    assert main([*args, "--genes", str(gene_file(tmp_path, BREAST, 280))]) == 0
    printed = capsys.readouterr().out
    assert "TENX_NOT_IN_SPLITS" in printed and "kept 5" in printed
    assert main([*args, "--genes", str(gene_file(tmp_path, BREAST, 280))]) == 2  # exists, no --overwrite
    assert main(["inspect", str(out)]) == 0
