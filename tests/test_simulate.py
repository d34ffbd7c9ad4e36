"""The known-answer simulator: deterministic, valid, donor-split, and both modalities carry the truth."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from hescape.cli import main
from hescape.data import keys
from hescape.data.panel import read_panel, validate_panel
from hescape.data.simulate import SimulationConfig, simulate_panel, simulate_to_dir
from hescape.errors import ConfigError

# Small enough for a second per panel; three donors with two samples each, so every split holds both
# mutation labels.
SMALL = SimulationConfig(n_spots=300, n_samples=6, n_donors=3, patch_px=32, seed=7)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "panel"
    meta = simulate_to_dir(SMALL, out)
    return out, meta


def _hashes(meta) -> list[str]:
    return [f["sha256"] for f in meta.files]


def _log_norm(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(float)
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e3)


def test_same_seed_gives_identical_files_and_another_seed_does_not(written, tmp_path):
    _, meta = written
    again = simulate_to_dir(SMALL, tmp_path / "again")
    assert _hashes(again) == _hashes(meta)
    assert json.loads((tmp_path / "again" / keys.PANEL_JSON).read_text()) == json.loads(
        (written[0] / keys.PANEL_JSON).read_text())
    other = simulate_to_dir(replace(SMALL, seed=8), tmp_path / "other")
    assert not set(_hashes(other)) & set(_hashes(meta))


def test_written_panel_validates_with_its_truth(written):
    out, _ = written
    panel, report = validate_panel(out)
    assert report.warnings == []  # no donor shared between train and a held-out split
    assert len(panel) == SMALL.n_spots
    assert panel.meta.label_columns == [keys.MUTATION]
    assert panel.meta.patch_size_px == 32 and panel.meta.patch_size_um == 55.0
    assert panel.meta.pixel_size_um == pytest.approx(55.0 / 32)
    assert panel.meta.provenance["source"] == "simulator"
    assert panel.meta.provenance["config"]["seed"] == SMALL.seed
    assert "version" in panel.meta.provenance
    assert set(panel.obs[keys.SOURCE]) == {"simulator"}
    assert panel.obs[keys.SAMPLE].nunique() == 6 and panel.obs[keys.DONOR].nunique() == 3
    assert panel.decode_images([0]).shape == (1, 32, 32, 3)
    assert (panel.counts >= 0).all() and panel.counts.dtype == np.int32


def test_splits_are_by_donor_and_hold_both_mutation_labels(written):
    panel = read_panel(written[0], images=False)
    donors = {s: set(panel.obs.loc[panel.obs[keys.SPLIT] == s, keys.DONOR]) for s in ("train", "val", "test")}
    assert all(donors.values())
    assert not donors["train"] & donors["test"] and not donors["train"] & donors["val"]
    assert not donors["val"] & donors["test"]
    for split in ("train", "val", "test"):
        labels = panel.obs.loc[panel.obs[keys.SPLIT] == split].groupby(keys.SAMPLE)[keys.MUTATION].agg(["min", "max"])
        assert (labels["min"] == labels["max"]).all()  # sample-level label
        assert set(labels["min"]) == {0, 1}, split


def test_composition_is_a_distribution_and_names_the_dominant_type(written):
    panel = read_panel(written[0], images=False)
    comp = panel.obsm[keys.COMPOSITION]
    assert comp.shape == (SMALL.n_spots, SMALL.n_cell_types) and comp.dtype == np.float32
    assert np.allclose(comp.sum(1), 1.0, atol=1e-5) and (comp >= 0).all()
    names = panel.meta.provenance["truth"]["cell_types"]
    assert (panel.obs[keys.CELL_TYPE].to_numpy() == np.array(names)[comp.argmax(1)]).all()
    # Spatially smooth: neighbouring spots of a slide are more alike than random pairs.
    obs = panel.obs
    first = (obs[keys.SAMPLE] == obs[keys.SAMPLE].iloc[0]).to_numpy()
    c, y = comp[first], obs.loc[first, keys.Y].to_numpy()
    same_row = y[1:] == y[:-1]
    neighbour = np.abs(c[1:] - c[:-1]).sum(1)[same_row].mean()
    shuffled = np.abs(c - c[np.random.default_rng(0).permutation(len(c))]).sum(1).mean()
    assert neighbour < 0.8 * shuffled


def test_median_depth_is_near_the_configured_one(written):
    panel = read_panel(written[0], images=False)
    assert 0.5 * SMALL.mean_depth < np.median(panel.counts.sum(1)) < 2 * SMALL.mean_depth


def test_donor_batch_effect_in_counts_and_images():
    # Same seed with and without donor effects: identical cells, so the differences are the batch effect.
    cfg = replace(SMALL, patch_px=16)
    with_batch, without = simulate_panel(cfg), simulate_panel(replace(cfg, batch_strength=0.0))
    assert np.array_equal(with_batch.obsm[keys.COMPOSITION], without.obsm[keys.COMPOSITION])
    obs = with_batch.obs
    colour_b = with_batch.decode_images().astype(float).mean((1, 2))
    colour_0 = without.decode_images().astype(float).mean((1, 2))
    bias, shift = {}, {}
    for sid in obs[keys.SAMPLE].unique():
        m = (obs[keys.SAMPLE] == sid).to_numpy()
        ratio = np.log((with_batch.counts[m].sum(0) + 1) / (without.counts[m].sum(0) + 1))
        bias[sid] = ratio - ratio.mean()  # gene-wise capture bias, depth removed
        shift[sid] = (colour_b[m] - colour_0[m]).mean(0)  # stain colour shift
    donor_of = obs.groupby(keys.SAMPLE)[keys.DONOR].first()
    same, other, same_shift, other_shift = [], [], [], []
    ids = sorted(bias)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            corr = np.corrcoef(bias[a], bias[b])[0, 1]
            dist = np.linalg.norm(shift[a] - shift[b])
            if donor_of[a] == donor_of[b]:
                same.append(corr), same_shift.append(dist)
            else:
                other.append(corr), other_shift.append(dist)
    # A donor's two samples share its capture bias and stain; different donors do not.
    assert min(same) > max(other) + 0.1 and min(same) > 0.2
    assert np.mean(same_shift) < 0.5 * np.mean(other_shift)
    assert max(np.linalg.norm(v) for v in shift.values()) > 2.0  # grey levels


def test_mutation_shifts_marked_genes_and_nuclei():
    cfg = replace(SMALL, patch_px=16)
    mutated, plain = simulate_panel(cfg), simulate_panel(replace(cfg, mutation_strength=0.0))
    genes = mutated.meta.genes
    mut_genes = mutated.meta.provenance["truth"]["mutation_genes"]
    is_mut = np.isin(genes, mut_genes)
    on = (mutated.obs[keys.MUTATION] == 1).to_numpy()
    shift = np.abs(_log_norm(mutated.counts[on]).mean(0) - _log_norm(plain.counts[on]).mean(0))
    assert shift[is_mut].mean() > 3 * shift[~is_mut].mean()
    # Images of wild-type samples are untouched; mutated samples have larger, darker nuclei.
    off_index = np.flatnonzero(~on)[:20]
    assert mutated.images[off_index[0]] == plain.images[off_index[0]]
    on_index = np.flatnonzero(on)
    assert mutated.decode_images(on_index).mean() < plain.decode_images(on_index).mean() - 1.0


def test_cell_types_drive_the_images(written):
    panel = read_panel(written[0])
    comp = panel.obsm[keys.COMPOSITION]
    colour = panel.decode_images().astype(float).mean((1, 2))  # mean RGB per patch
    design = np.c_[comp, np.ones(len(comp))]
    fitted = design @ np.linalg.lstsq(design, colour, rcond=None)[0]
    r2 = 1 - ((fitted - colour) ** 2).sum(0) / ((colour - colour.mean(0)) ** 2).sum(0)
    assert r2.mean() > 0.4, r2
    pure = comp.max(1) > 0.5
    grey = colour.mean(1)
    means = {n: grey[pure & (panel.obs[keys.CELL_TYPE] == n).to_numpy()].mean() for n in ("adipocyte", "myeloid")}
    assert means["adipocyte"] > means["myeloid"] + 20  # fat is pale, macrophage-rich tissue is dense


def test_real_gene_list_sets_genes_and_real_markers(reference_dir):
    path = reference_dir / "hescape/panels/human-breast-panel.genes.tsv"
    if not path.exists():
        pytest.skip(f"{path} not found")
    from hescape.data.registry import read_gene_file

    symbols, ensembl = read_gene_file(path)
    panel = simulate_panel(replace(SMALL, n_spots=60, patch_px=16, n_genes=5, genes_file=str(path)))
    assert panel.meta.genes == symbols and panel.meta.ensembl_ids == ensembl
    assert panel.counts.shape == (60, len(symbols))
    assert panel.meta.provenance["config"]["n_genes"] == len(symbols)
    markers = panel.meta.provenance["truth"]["markers"]
    assert set(markers["epithelial"]) & {"EPCAM", "KRT8", "CDH1"}
    assert set(markers["immune"]) & {"PTPRC", "CD3E", "MS4A1"}
    # Markers are expressed in their own cell type's spots.
    x = _log_norm(panel.counts)
    idx = [symbols.index(g) for g in markers["immune"]]
    immune = panel.obsm[keys.COMPOSITION][:, 1]
    assert np.corrcoef(x[:, idx].mean(1), immune)[0, 1] > 0.3


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HESCAPE_PARAMS", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text("simulate:\n  n_cell_types: 4\n  n_genes: 50\n  patch_px: 64\n")
    out = tmp_path / "cli-panel"
    rc = main(["simulate", "--out", str(out), "--params", str(params), "--set", "simulate.n_tissues=1",
               "--spots", "120", "--samples", "4", "--donors", "3", "--patch-px", "16", "--seed", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "120 spots" in printed and "4 samples" in printed and "3 donors" in printed and "50 genes" in printed
    panel, _ = validate_panel(out)
    cfg = panel.meta.provenance["config"]
    assert (cfg["n_cell_types"], cfg["n_tissues"], cfg["seed"], cfg["patch_px"]) == (4, 1, 3, 16)
    assert panel.obsm[keys.COMPOSITION].shape == (120, 4)
    # An existing directory is kept unless --overwrite is given.
    assert main(["simulate", "--out", str(out), "--params", str(params), "--spots", "120"]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--spots", "0"], "n_spots must be at least 1"),
        (["--donors", "2"], "n_donors (2) must be at least test_donors + val_donors + 1"),
        (["--samples", "2", "--donors", "3"], "n_samples (2) must be at least n_donors"),
        (["--patch-px", "4"], "patch_px"),
        (["--set", "simulate.no_such_key=1"], "unknown key"),
        (["--set", "simulate.n_spots=many"], "expected an integer"),
    ],
)
def test_cli_rejects_bad_configuration(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.delenv("HESCAPE_PARAMS", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text("simulate: {}\n")
    out = tmp_path / "bad"
    assert main(["simulate", "--out", str(out), "--params", str(params), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [params]


def test_config_errors_raise_before_any_work():
    with pytest.raises(ConfigError, match="n_donors"):
        simulate_panel(replace(SMALL, n_donors=2))
    with pytest.raises(ConfigError, match="n_genes"):
        simulate_panel(replace(SMALL, n_genes=5))
