"""Curated panel format: round trip, validation of every bad input, atomic writes, the registry."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hescape.cli import main
from hescape.data import keys
from hescape.data.panel import Panel, PanelMeta, encode_png, read_panel, validate_panel, write_panel
from hescape.data.registry import get_panel_spec, panel_names, read_gene_file, read_split_tables
from hescape.errors import DataError, UnknownNameError

G = 6
PX = 8


def make_panel(donors=("d1", "d2", "d3"), n_per=5, seed=0) -> Panel:
    rng = np.random.default_rng(seed)
    samples = ["A", "B", "C"]
    n = n_per * len(samples)
    obs = pd.DataFrame({
        keys.SAMPLE: np.repeat(samples, n_per),
        keys.DONOR: np.repeat(list(donors), n_per),
        keys.TISSUE: "breast",
        keys.SOURCE: "test",
        keys.X: np.arange(n, dtype=float),
        keys.Y: np.zeros(n),
        keys.MUTATION: np.repeat([0, 1, 0], n_per),
    })
    meta = PanelMeta(name="tiny", genes=[f"G{i}" for i in range(G)],
                     splits={"train": ["A"], "val": ["B"], "test": ["C"]}, patch_size_px=PX,
                     label_columns=[keys.MUTATION])
    images = [encode_png(rng.integers(0, 255, (PX, PX, 3), dtype=np.uint8)) for _ in range(n)]
    return Panel(meta=meta, obs=obs, counts=rng.poisson(4, (n, G)).astype(np.int32), images=images,
                 obsm={keys.COMPOSITION: rng.dirichlet(np.ones(3), n).astype(np.float32)})


@pytest.fixture
def panel_dir(tmp_path):
    out = tmp_path / "panel"
    write_panel(make_panel(), out)
    return out


def rewrite_part(panel_dir, transform):
    """Apply ``transform(table) -> table`` to the test sample's file and fix its hash in panel.json,
    so that only the content check (not the hash check) can catch the corruption."""
    from hescape.io import sha256_file

    meta = json.loads((panel_dir / keys.PANEL_JSON).read_text())
    entry = next(e for e in meta["files"] if e["samples"] == ["C"])
    path = panel_dir / entry["path"]
    pq.write_table(transform(pq.read_table(path)), path)
    entry["sha256"] = sha256_file(path)
    (panel_dir / keys.PANEL_JSON).write_text(json.dumps(meta))
    return path


def set_column(table, name, values, type_=None):
    idx = table.schema.get_field_index(name)
    return table.set_column(idx, name, pa.array(values, type_))


def test_round_trip(panel_dir):
    original = make_panel()
    panel, report = validate_panel(panel_dir)
    assert report.ok and not report.warnings
    np.testing.assert_array_equal(panel.counts, original.counts)
    assert panel.images == original.images
    np.testing.assert_allclose(panel.obsm[keys.COMPOSITION], original.obsm[keys.COMPOSITION])
    assert list(panel.obs[keys.SPLIT]) == ["train"] * 5 + ["val"] * 5 + ["test"] * 5
    assert panel.obs[keys.MUTATION].tolist() == original.obs[keys.MUTATION].tolist()
    only_test = read_panel(panel_dir, splits=["test"], images=False)
    assert set(only_test.obs[keys.SAMPLE]) == {"C"} and only_test.images is None


def test_content_hash_changes_with_content(tmp_path):
    a = write_panel(make_panel(seed=0), tmp_path / "a")
    b = write_panel(make_panel(seed=1), tmp_path / "b")
    c = write_panel(make_panel(seed=0), tmp_path / "c")
    assert a.content_hash != b.content_hash
    assert a.content_hash == c.content_hash


def test_inspect_cli(panel_dir, capsys):
    assert main(["inspect", str(panel_dir)]) == 0
    out = capsys.readouterr().out
    assert "valid: yes" in out and "spots per split" in out
    assert main(["inspect", str(panel_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["spots_per_split"] == {"train": 5, "val": 5, "test": 5}
    assert summary["n_genes"] == G and summary["patch_size_px"] == PX


def expect_error(panel_dir, capsys, *fragments):
    with pytest.raises(DataError) as info:
        validate_panel(panel_dir)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert main(["inspect", str(panel_dir)]) == 2
    assert fragments[0] in capsys.readouterr().err
    return info.value


def test_missing_column(panel_dir, capsys):
    rewrite_part(panel_dir, lambda t: t.drop_columns([keys.TISSUE]))
    err = expect_error(panel_dir, capsys, "missing column", "part-00002.parquet")
    assert err.field == keys.TISSUE


def test_gexp_length_mismatch(panel_dir, capsys):
    def shorten(t):
        rows = t.column(keys.GEXP).to_pylist()
        rows[3] = [rows[3][0][:-1]]
        return set_column(t, keys.GEXP, rows, pa.list_(pa.list_(pa.int32())))

    rewrite_part(panel_dir, shorten)
    err = expect_error(panel_dir, capsys, "5 values, the panel has 6 genes", "record 3", "'gexp'")
    assert err.record == 3


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1, "negative counts"), (float("nan"), "NaN"), (2.5, "non-integer")],
)
def test_bad_counts(panel_dir, capsys, value, message):
    def corrupt(t):
        rows = t.column(keys.GEXP).to_pylist()
        rows = [[[float(v) for v in r[0]]] for r in rows]
        rows[2][0][4] = value
        return set_column(t, keys.GEXP, rows, pa.list_(pa.list_(pa.float64())))

    rewrite_part(panel_dir, corrupt)
    err = expect_error(panel_dir, capsys, message, "record 2")
    assert err.field == keys.GEXP


def test_undecodable_image(panel_dir, capsys):
    def corrupt(t):
        images = t.column(keys.IMAGE).to_pylist()
        images[1]["bytes"] = b"not a png"
        return set_column(t, keys.IMAGE, images)

    rewrite_part(panel_dir, corrupt)
    err = expect_error(panel_dir, capsys, "undecodable image", "record 1")
    assert err.field == keys.IMAGE


def test_wrongly_sized_image(panel_dir, capsys):
    def corrupt(t):
        images = t.column(keys.IMAGE).to_pylist()
        images[4]["bytes"] = encode_png(np.zeros((PX + 2, PX, 3), np.uint8))
        return set_column(t, keys.IMAGE, images)

    rewrite_part(panel_dir, corrupt)
    expect_error(panel_dir, capsys, "panel.json says 8x8", "record 4", "'image'")


def test_changed_file_fails_hash_check(panel_dir, capsys):
    meta = json.loads((panel_dir / keys.PANEL_JSON).read_text())
    path = panel_dir / meta["files"][0]["path"]
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 4), path)
    expect_error(panel_dir, capsys, "SHA-256 differs")


def edit_meta(panel_dir, **changes):
    meta = json.loads((panel_dir / keys.PANEL_JSON).read_text())
    meta.update(changes)
    (panel_dir / keys.PANEL_JSON).write_text(json.dumps(meta))


def test_sample_in_two_splits(panel_dir, capsys):
    edit_meta(panel_dir, splits={"train": ["A", "B"], "val": ["B"], "test": ["C"]})
    err = expect_error(panel_dir, capsys, "sample 'B' is in two splits")
    assert err.field == "splits"


def test_empty_split(panel_dir, capsys):
    edit_meta(panel_dir, splits={"train": ["A", "B"], "val": [], "test": ["C"]})
    expect_error(panel_dir, capsys, "split 'val' is empty")


def test_split_without_records(panel_dir, capsys):
    edit_meta(panel_dir, splits={"train": ["A"], "val": ["B"], "test": ["C", "Z"]})
    # C still has records, so the test split is not empty; a split of only absent samples is:
    edit_meta(panel_dir, splits={"train": ["A"], "val": ["B", "C"], "test": ["Z"]})
    expect_error(panel_dir, capsys, "split 'test' has no records")


def test_shared_donor_is_a_warning(tmp_path, capsys):
    out = tmp_path / "p"
    write_panel(make_panel(donors=("d1", "d2", "d1")), out)
    with pytest.warns(UserWarning, match="in both train and test"):
        _, report = validate_panel(out)
    assert report.ok and len(report.warnings) == 1
    assert main(["inspect", str(out)]) == 0
    assert "warning: donor(s) ['d1'] in both train and test" in capsys.readouterr().out


def test_write_is_atomic(tmp_path):
    panel = make_panel()
    panel.obs.loc[3, keys.SAMPLE] = "Q"  # a sample in no split
    with pytest.raises(DataError, match="samples in no split"):
        write_panel(panel, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
    # An existing panel is replaced only on explicit request, and not by a failing write.
    write_panel(make_panel(), tmp_path / "out")
    with pytest.raises(FileExistsError):
        write_panel(make_panel(), tmp_path / "out")
    before = (tmp_path / "out" / keys.PANEL_JSON).read_text()
    bad = make_panel()
    bad.counts = bad.counts[:, :3]
    with pytest.raises(ValueError):
        write_panel(bad, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / keys.PANEL_JSON).read_text() == before


def test_registry_matches_reference_split_tables(reference_dir):
    for name in panel_names():
        spec = get_panel_spec(name)
        tables = read_split_tables(reference_dir / "hescape" / "splits" / name)
        for split in ("train", "val", "test"):
            assert spec.splits[split] == list(tables[split]), (name, split)
        symbols, ensembl = read_gene_file(reference_dir / "hescape" / "panels" / f"{name}.genes.tsv")
        assert len(symbols) == spec.n_genes, name
        assert ensembl is not None and len(ensembl) == len(symbols)
    assert len(panel_names()) == 7


def test_registry_facts():
    assert get_panel_spec("human-breast-panel").splits["test"] == ["NCBI783"]
    assert get_panel_spec("human-5k-panel").n_genes == 5001
    lung = get_panel_spec("human-lung-healthy-panel")
    assert (lung.filter_column, lung.filter_values) == ("tissue", ("lung",))
    assert lung.donor_of("NCBI883") != lung.donor_of("NCBI861")
    multi = get_panel_spec("human-multi-tissue-panel")
    # "patient 2" of two different studies are two different donors.
    assert multi.donor_of("TENX118") != multi.donor_of("TENX124")
    with pytest.raises(UnknownNameError, match="known panels: human-5k-panel"):
        get_panel_spec("human-kidney-panel")


def test_gene_file_errors(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_gene_file(empty)
    dup = tmp_path / "dup.tsv"
    dup.write_text("symbol\tensembl_id\nA\tE1\nB\tE2\nA\tE3\n")
    with pytest.raises(DataError, match="duplicate gene symbols"):
        read_gene_file(dup)
    plain = tmp_path / "plain.txt"
    plain.write_text("A\nB\n")
    assert read_gene_file(plain) == (["A", "B"], None)
