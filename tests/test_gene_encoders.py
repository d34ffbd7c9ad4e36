"""Gene transforms (per spot, train-only statistics, Nicheformer tokenisation) and gene encoders
(mlp, nicheformer, registries, checkpoint loading)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hescape.data.gene_transforms import (
    GENE_TRANSFORMS,
    GeneStats,
    fit_gene_stats,
    library_size_log1p,
    log1p,
    nicheformer_tokens,
    transform_for,
)
from hescape.data.simulate import SimulationConfig, simulate_panel
from hescape.errors import ConfigError, UnknownNameError
from hescape.models.gene_encoders import GENE_ENCODERS, create_gene_encoder
from hescape.models.nicheformer import (
    Nicheformer,
    load_nicheformer_checkpoint,
    read_gene_token_map,
    save_nicheformer_checkpoint,
)

SMALL = {"d_model": 32, "n_heads": 4, "n_layers": 2, "dim_feedforward": 64}


@pytest.fixture(scope="module")
def panel():
    return simulate_panel(SimulationConfig(n_spots=240, n_samples=5, n_donors=5, n_genes=40, patch_px=16, seed=3))


@pytest.fixture(scope="module")
def stats(panel):
    return fit_gene_stats(panel.counts[panel.split_mask("train")], panel_hash=panel.meta.content_hash)


#  Statistics


def test_gene_stats_are_fitted_on_the_given_spots_and_round_trip(tmp_path):
    counts = np.array([[0, 0, 0], [1, 3, 0], [2, 2, 4], [5, 0, 5]])  # totals 0, 4, 8, 10
    stats = fit_gene_stats(counts, panel_hash="abc")
    assert stats.n_spots == 3  # the empty spot is skipped
    assert stats.median_total == 8.0
    expected = np.array([[2500, 7500, 0], [2500, 2500, 5000], [5000, 0, 5000]]).mean(0)
    np.testing.assert_allclose(stats.technology_mean, expected)
    stats.save(tmp_path / "stats.json")
    assert GeneStats.load(tmp_path / "stats.json") == stats
    assert GeneStats.from_json(json.loads(json.dumps(stats.to_json()))) == stats


#  Per-spot transforms


def test_library_size_log1p_hand_example():
    counts = np.array([[1, 3, 0], [0, 0, 0]])
    out = library_size_log1p(counts, target_sum=8.0)
    np.testing.assert_allclose(out, np.log1p([[2.0, 6.0, 0.0], [0.0, 0.0, 0.0]]), rtol=1e-6)
    assert out.dtype == np.float32
    with pytest.raises(ConfigError):
        library_size_log1p(counts, target_sum=0.0)


def _transforms(stats: GeneStats):
    ids = np.arange(stats.n_genes)
    return {
        "log1p_norm": lambda c: library_size_log1p(c, stats.median_total),
        "log1p": log1p,
        "tokens": lambda c: nicheformer_tokens(c, ids, stats.technology_mean, context=24),
    }


@pytest.mark.parametrize("kind", ["log1p_norm", "log1p", "tokens"])
def test_transforms_are_per_spot(panel, stats, kind):
    """A spot's transform is identical alone, in the whole panel and in any shuffled batch; the torch
    version agrees with numpy (exactly for tokens, to float32 rounding of log1p otherwise)."""
    fn = _transforms(stats)[kind]
    counts = panel.counts
    full = fn(counts)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(counts), 10, replace=False):
        np.testing.assert_array_equal(fn(counts[i:i + 1])[0], full[i])
        np.testing.assert_array_equal(fn(counts[i]), full[i])  # a single 1-D spot
    perm = rng.permutation(len(counts))
    for batch in np.array_split(perm, 7):
        np.testing.assert_array_equal(fn(counts[batch]), full[batch])
    as_torch = fn(torch.from_numpy(counts))
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.from_numpy(full).dtype
    np.testing.assert_allclose(as_torch.numpy(), full, rtol=1e-6, atol=0 if kind == "tokens" else 1e-7)
    for batch in np.array_split(perm, 3):
        np.testing.assert_array_equal(fn(torch.from_numpy(counts[batch])).numpy(), as_torch.numpy()[batch])


def test_nicheformer_tokens_hand_example():
    counts = np.array([
        [0, 2, 2, 4, 0, 2],  # total 10
        [0, 0, 0, 0, 0, 0],  # empty spot: all padding
        [1, 0, 0, 0, 3, 0],  # total 4
    ])
    tech_mean = np.array([1.0, 1.0, 2.0, 1.0, 5.0, 0.0])  # a zero mean is replaced by 1
    # Spot 0 scaled to 10,000 and divided by the mean: [0, 2000, 1000, 4000, 0, 2000]; zeros excluded,
    # gene 3 first, the tie of genes 1 and 5 in gene order, gene 2 (halved by its mean) last.
    # Spot 2: gene 0 = 2500, gene 4 = 7500 / 5 = 1500.
    ids = np.arange(6)
    out = nicheformer_tokens(counts, ids, tech_mean, context=6, n_special=30, pad_token=1)
    np.testing.assert_array_equal(out, [[33, 31, 35, 32, 1, 1], [1] * 6, [30, 34, 1, 1, 1, 1]])
    assert out.dtype == np.int64
    # Truncation keeps the top-ranked genes.
    np.testing.assert_array_equal(nicheformer_tokens(counts[:1], ids, tech_mean, context=3), [[33, 31, 35]])
    # Prefix tokens come first and count towards the context.
    np.testing.assert_array_equal(
        nicheformer_tokens(counts[:1], ids, tech_mean, context=4, prefix_tokens=(5, 9)), [[5, 9, 33, 31]])
    # A vocabulary mapping: gene 2 is not in the vocabulary and is never emitted.
    vocab = np.array([100, 101, -1, 103, 104, 105])
    np.testing.assert_array_equal(nicheformer_tokens(counts[:1], vocab, tech_mean, context=5, n_special=10),
                                  [[113, 111, 115, 1, 1]])
    # Other offset and pad token; context longer than the panel pads.
    np.testing.assert_array_equal(nicheformer_tokens(counts[2], ids, tech_mean, context=8, n_special=3, pad_token=0),
                                  [3, 7, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ConfigError):
        nicheformer_tokens(counts, ids[:5], tech_mean)


def test_transform_for_each_encoder(stats):
    counts = np.array([[0, 3] + [1] * (stats.n_genes - 2)])
    mlp = create_gene_encoder("mlp", stats.n_genes)
    np.testing.assert_array_equal(transform_for(mlp, stats)(counts), library_size_log1p(counts, stats.median_total))
    np.testing.assert_array_equal(transform_for("log1p", None)(counts), log1p(counts))
    nf = create_gene_encoder("nicheformer", stats.n_genes, **SMALL)
    tokens = transform_for(nf, stats)(counts)
    assert tokens.shape == (1, stats.n_genes)  # context defaults to min(1500, n_genes)
    np.testing.assert_array_equal(tokens, nicheformer_tokens(counts, np.arange(stats.n_genes), stats.technology_mean,
                                                             context=stats.n_genes))
    with pytest.raises(ConfigError):
        transform_for(mlp, None)


def test_unknown_names_list_known_ones():
    with pytest.raises(UnknownNameError, match="known gene encoders: drvi, mlp, nicheformer"):
        create_gene_encoder("scgpt", 10)
    with pytest.raises(UnknownNameError, match="log1p_norm"):
        transform_for("zscore", None)
    assert GENE_TRANSFORMS.names() == ["log1p", "log1p_norm", "tokens"]
    assert GENE_ENCODERS.names() == ["drvi", "mlp", "nicheformer"]


#  Encoders


def test_mlp_shapes_and_layers():
    enc = create_gene_encoder("mlp", 50)
    assert (enc.feature_dim, enc.input_kind, enc.trainable) == (128, "log1p_norm", True)
    kinds = [type(m).__name__ for m in enc.net]
    assert kinds == ["Linear"] + ["BatchNorm1d", "ReLU", "Dropout", "Linear"] * 3 + ["BatchNorm1d", "ReLU"]
    assert enc(torch.randn(8, 50)).shape == (8, 128)
    frozen = create_gene_encoder("mlp", 50, trainable=False)
    frozen.train()
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_nicheformer_forward(panel, stats):
    torch.manual_seed(0)
    enc = create_gene_encoder("nicheformer", panel.meta.n_genes, **SMALL).eval()
    assert (enc.feature_dim, enc.input_kind, enc.trainable) == (32, "tokens", True)
    tokens = torch.from_numpy(transform_for(enc, stats)(panel.counts[:16]))
    tokens[3] = enc.config["pad_token"]  # an empty spot
    with torch.no_grad():
        out = enc(tokens)
        assert out.shape == (16, 32) and torch.isfinite(out).all()
        # Padding is masked: trimming trailing padding, or a spot's batch-mates, do not change it.
        enc.trim_padding = False
        np.testing.assert_allclose(enc(tokens).numpy(), out.numpy(), atol=1e-5)
        enc.trim_padding = True
        np.testing.assert_allclose(enc(tokens[5:6]).numpy(), out[5:6].numpy(), atol=1e-5)
    enc.train()
    enc(tokens).sum().backward()
    assert enc.embeddings.weight.grad is not None


def _small_checkpoint(tmp_path, n_genes=12):
    torch.manual_seed(1)
    model = Nicheformer.from_scratch(n_genes, **SMALL).eval()
    path = tmp_path / "nicheformer.ckpt"
    save_nicheformer_checkpoint(model, path)
    return model, path


def test_nicheformer_checkpoint_round_trip(tmp_path):
    model, path = _small_checkpoint(tmp_path)
    loaded = load_nicheformer_checkpoint(path)
    assert not loaded.trainable and not loaded.training
    tokens = torch.tensor([[35, 31, 40, 1, 1, 1], [33, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(tokens).numpy(), model(tokens).numpy())
    # An official-style Lightning checkpoint: extra heads are ignored by the documented mapping,
    # hyper-parameters come under the official names, and a bare state dict needs n_heads.
    official = torch.load(path, weights_only=True)
    official["state_dict"]["classifier_head.weight"] = torch.zeros(3, 32)
    official["state_dict"]["encoder_layer.linear1.weight"] = torch.zeros(64, 32)
    torch.save(official, tmp_path / "official.ckpt")
    assert load_nicheformer_checkpoint(tmp_path / "official.ckpt").config == loaded.config
    torch.save(official["state_dict"], tmp_path / "bare.pt")
    with pytest.raises(ConfigError, match="n_heads"):
        load_nicheformer_checkpoint(tmp_path / "bare.pt")
    assert load_nicheformer_checkpoint(tmp_path / "bare.pt", n_heads=4).config["n_layers"] == 2


def test_nicheformer_checkpoint_is_strict(tmp_path):
    _, path = _small_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    missing = {**ckpt, "state_dict": {k: v for k, v in ckpt["state_dict"].items()
                                      if k != "encoder.layers.1.linear2.weight"}}
    torch.save(missing, tmp_path / "missing.ckpt")
    with pytest.raises(ConfigError, match=r"missing keys \['encoder.layers.1.linear2.weight'\]"):
        load_nicheformer_checkpoint(tmp_path / "missing.ckpt")
    extra = {**ckpt, "state_dict": {**ckpt["state_dict"], "adapter.weight": torch.zeros(2)}}
    torch.save(extra, tmp_path / "extra.ckpt")
    with pytest.raises(ConfigError, match=r"unexpected keys \['adapter.weight'\]"):
        load_nicheformer_checkpoint(tmp_path / "extra.ckpt")
    wrong = {**ckpt, "state_dict": {**ckpt["state_dict"], "encoder.layers.0.linear1.bias": torch.zeros(7)}}
    torch.save(wrong, tmp_path / "wrong.ckpt")
    with pytest.raises(ConfigError, match="shape mismatches encoder.layers.0.linear1.bias"):
        load_nicheformer_checkpoint(tmp_path / "wrong.ckpt")
    (tmp_path / "pickle.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="weights_only"):
        load_nicheformer_checkpoint(tmp_path / "pickle.ckpt")


def test_nicheformer_checkpoint_with_gene_mapping(tmp_path):
    _, path = _small_checkpoint(tmp_path, n_genes=12)
    (tmp_path / "genes.tsv").write_text("symbol\ttoken_id\nCD3E\t4\nEPCAM\t0\nMS4A1\t11\n")
    assert read_gene_token_map(tmp_path / "genes.tsv") == {"CD3E": 4, "EPCAM": 0, "MS4A1": 11}
    tech = np.arange(1, 13, dtype=np.float64)
    np.save(tmp_path / "xenium_mean.npy", tech)
    panel_genes = ["EPCAM", "UNKNOWN", "MS4A1", "CD3E"]
    enc = create_gene_encoder("nicheformer", 4, checkpoint=path, genes=panel_genes, gene_map=tmp_path / "genes.tsv",
                              technology_mean=tmp_path / "xenium_mean.npy")
    np.testing.assert_array_equal(enc.gene_token_ids, [0, -1, 11, 4])
    np.testing.assert_array_equal(enc.technology_mean, [1.0, 1.0, 12.0, 5.0])
    stats = GeneStats(n_genes=4, n_spots=1, median_total=10.0, technology_mean=[1.0] * 4)
    # Over the official mean (vocabulary order): EPCAM 1/1, CD3E 2/5, MS4A1 1/12; UNKNOWN is skipped.
    tokens = transform_for(enc, stats)(np.array([[1, 5, 1, 2]]))
    np.testing.assert_array_equal(tokens[0, :4], [30, 34, 41, 1])
    with pytest.raises(ConfigError, match="none of the panel's genes"):
        load_nicheformer_checkpoint(path, genes=["X", "Y"], gene_map={"A": 1})
    with pytest.raises(ConfigError, match="covers 4 genes"):
        create_gene_encoder("nicheformer", 5, checkpoint=path, genes=panel_genes, gene_map=tmp_path / "genes.tsv")
