"""DRVI gene encoder: trained on the training split only, cached by panel and parameter hash, and
exported as a plain torch module equal to DRVI's own posterior mean."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from hescape.data import keys
from hescape.data.gene_transforms import log1p, transform_for
from hescape.data.simulate import SimulationConfig, simulate_panel
from hescape.errors import ConfigError
from hescape.models.drvi_encoder import ENCODER_JSON, MODEL_DIR, DrviEncoder, pretrain_drvi, training_anndata
from hescape.models.gene_encoders import create_gene_encoder

pytestmark = pytest.mark.slow

PARAMS = {"n_latent": 8, "encoder_dims": (32, 32), "decoder_dims": (32, 32), "max_epochs": 3, "batch_size": 64,
          "seed": 0, "accelerator": "cpu"}


@pytest.fixture(scope="module")
def panel():
    return simulate_panel(SimulationConfig(n_spots=300, n_samples=5, n_donors=5, n_genes=40, patch_px=16, seed=1))


@pytest.fixture(scope="module")
def trained(panel, tmp_path_factory):
    cache = tmp_path_factory.mktemp("drvi-cache")
    return cache, pretrain_drvi(panel, cache, **PARAMS)


def test_drvi_trains_on_the_training_split_only(panel, trained):
    import drvi

    _, path = trained
    train = sorted(panel.meta.samples_of("train"))
    held_out = set(panel.meta.samples_of("val")) | set(panel.meta.samples_of("test"))
    info = json.loads((path / ENCODER_JSON).read_text())
    assert info["train_samples"] == train and not held_out & set(info["train_samples"])
    assert info["n_train_spots"] == int(panel.split_mask("train").sum())
    assert info["panel_hash"] == panel.meta.content_hash and path.name.startswith(f"drvi-{panel.meta.content_hash}-")
    # The saved model's own registry: its sample covariate knows only training samples, and it saw
    # exactly the training spots.
    registry = drvi.model.DRVI.load_registry(str(path / MODEL_DIR))
    covs = registry["field_registries"]["extra_categorical_covs"]["state_registry"]
    assert sorted(covs["mappings"][keys.SAMPLE]) == train
    assert registry["field_registries"]["X"]["summary_stats"]["n_cells"] == info["n_train_spots"]


def test_exported_encoder_equals_drvi_latent(panel, trained):
    import drvi

    _, path = trained
    enc = DrviEncoder.load(path)
    assert (enc.feature_dim, enc.input_kind, enc.trainable, enc.n_genes) == (8, "log1p", False, panel.meta.n_genes)
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())

    adata = training_anndata(panel)
    model = drvi.model.DRVI.load(str(path / MODEL_DIR), adata=adata, accelerator="cpu")
    expected = model.get_latent_representation(adata)
    with torch.no_grad():
        ours = enc(log1p(torch.from_numpy(panel.counts[panel.split_mask("train")]))).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)

    # Unseen (test) samples: DRVI's encoder takes no covariate, so its own module encodes them from
    # log1p counts alone, and the exported copy agrees.
    test_counts = torch.from_numpy(panel.counts[panel.split_mask("test")])
    model.module.eval()
    with torch.no_grad():
        qz_m, _, _ = model.module.z_encoder(torch.log1p(test_counts.float()), None)
        np.testing.assert_allclose(enc(transform_for(enc, None)(test_counts)).numpy(), qz_m.numpy(), atol=1e-5)


def test_drvi_cache_hit_and_miss(panel, trained, monkeypatch):
    import drvi

    cache, path = trained
    stamp = (path / ENCODER_JSON).stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("DRVI trained again although the cache holds the model")

    with monkeypatch.context() as m:
        m.setattr(drvi.model.DRVI, "train", no_training)
        assert pretrain_drvi(panel, cache, **PARAMS) == path
    assert (path / ENCODER_JSON).stat().st_mtime_ns == stamp

    # Another panel content (here: another file hash) or other parameters: another entry, trained anew.
    other = dataclasses.replace(panel, meta=dataclasses.replace(
        panel.meta, files=[{"path": "part-0.parquet", "sha256": "0" * 64, "n_records": len(panel), "samples": []}]))
    assert other.meta.content_hash != panel.meta.content_hash
    other_path = pretrain_drvi(other, cache, **PARAMS)
    assert other_path != path and other_path.name.startswith(f"drvi-{other.meta.content_hash}-")
    assert pretrain_drvi(panel, cache, **{**PARAMS, "max_epochs": 2}) not in (path, other_path)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # no temporary leftovers


def test_create_gene_encoder_drvi(panel, trained):
    cache, path = trained
    enc = create_gene_encoder("drvi", panel.meta.n_genes, path=path)
    assert isinstance(enc, DrviEncoder)
    assert enc(torch.zeros(3, panel.meta.n_genes)).shape == (3, 8)
    same = create_gene_encoder("drvi", panel.meta.n_genes, panel=panel, cache_dir=cache, **PARAMS)
    assert same.info["params_hash"] == enc.info["params_hash"]
    with pytest.raises(ConfigError, match="40 genes"):
        create_gene_encoder("drvi", 41, path=path)
    with pytest.raises(ConfigError, match="path="):
        create_gene_encoder("drvi", 40)


def test_frozen_gene_features_through_the_feature_cache(panel, tmp_path):
    from hescape.data.panel import write_panel
    from hescape.data.shards import PreprocessConfig, Shards, build_shards
    from hescape.models.gene_encoders import frozen_gene_features

    write_panel(panel, tmp_path / "panel")
    shards = Shards(build_shards(tmp_path / "panel", PreprocessConfig(image_size=16, out_dir=str(tmp_path / "shards")),
                                 progress=False))
    drvi_kw = {k: v for k, v in PARAMS.items() if k != "accelerator"}
    cache = tmp_path / "cache"
    paths = frozen_gene_features("drvi", shards=shards, panel_dir=tmp_path / "panel", cache_dir=cache,
                                 progress=False, **drvi_kw)
    assert set(paths) == {"train", "val", "test"}
    (entry,) = (cache / "drvi").iterdir()
    enc = DrviEncoder.load(entry)
    for split, path in paths.items():
        feats = np.load(path)
        counts = shards.split(split).counts
        with torch.no_grad():
            np.testing.assert_allclose(feats, enc(log1p(torch.from_numpy(np.asarray(counts)))).numpy(), atol=1e-6)
    # Trainable encoders have no frozen features.
    assert frozen_gene_features("mlp", shards=shards, panel_dir=tmp_path / "panel", cache_dir=cache) is None
