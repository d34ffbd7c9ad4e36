"""Heads (linear, mlp, per-sample transformer) and strategies (frozen, lora, full) on CPU-sized
encoders."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from hescape.errors import ConfigError, UnknownNameError
from hescape.models.heads import HEADS, MLPHead, TransformerHead, create_head
from hescape.models.image_encoders import create_image_encoder
from hescape.models.strategies import STRATEGIES, StrategyModule, apply_strategy, is_frozen, lora_target_names

#  Heads


def test_head_registry_and_unknown_names():
    assert HEADS.names() == ["linear", "mlp", "transformer"]
    with pytest.raises(UnknownNameError, match="known heads: linear, mlp, transformer"):
        create_head("attention", 16)
    with pytest.raises(ConfigError, match="head 'mlp'"):
        create_head("mlp", 16, widht=3)


@pytest.mark.parametrize("name", ["linear", "mlp", "transformer"])
def test_heads_map_features_to_the_embedding(name):
    head = create_head(name, 48, hidden=32, dropout=0.2)  # one tuner config serves every head
    assert head(torch.randn(5, 48)).shape == (5, 128)
    assert create_head(name, 48, 64)(torch.randn(3, 48)).shape == (3, 64)


def test_mlp_head_is_the_protocol_head_and_tunable():
    head = create_head("mlp", 1024)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.GELU, nn.Dropout, nn.LayerNorm, nn.Linear, nn.Dropout]
    assert (head[0].in_features, head[0].out_features, head[4].out_features) == (1024, 256, 128)
    assert head[2].p == head[5].p == 0.2
    tuned = create_head("mlp", 1024, hidden=512, dropout=0.1)
    assert isinstance(tuned, MLPHead) and tuned[0].out_features == 512 and tuned[2].p == 0.1
    assert isinstance(create_head("linear", 1024), nn.Linear)


def test_transformer_head_takes_tokens_and_checks_the_input_rank():
    tokens = create_head("transformer", 24, input="tokens", hidden=32, heads=4)
    assert tokens(torch.randn(3, 7, 24)).shape == (3, 128)
    vector = create_head("transformer", 24, hidden=32, n_tokens=6)
    assert isinstance(vector, TransformerHead) and vector.encoder.layers[0].self_attn.batch_first
    with pytest.raises(ValueError, match="input='tokens'"):
        vector(torch.randn(3, 7, 24))
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        tokens(torch.randn(3, 24))
    with pytest.raises(ConfigError, match="not divisible"):
        create_head("transformer", 24, hidden=30, heads=4)


@pytest.mark.parametrize("mode", ["vector", "tokens"])
def test_transformer_head_never_mixes_samples_of_a_batch(mode):
    """The reference head attended across the batch; here each sample is processed alone."""
    torch.manual_seed(0)
    head = create_head("transformer", 16, 8, input=mode, hidden=32, heads=4, dropout=0.0)
    x = torch.randn(6, 5, 16) if mode == "tokens" else torch.randn(6, 16)
    head.eval()
    with torch.no_grad():
        batch = head(x)
        alone = torch.cat([head(x[i:i + 1]) for i in range(len(x))])
        perm = torch.randperm(len(x))
        permuted = head(x[perm])
        other = x.clone()
        other[1:] = torch.randn_like(other[1:])  # change every batch mate of sample 0
        changed = head(other)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted, batch[perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(changed[0], batch[0], atol=1e-5, rtol=1e-5)
    # Gradients agree: sample 0's output does not depend on sample 1's input at all (train mode).
    head.train()
    x = x.clone().requires_grad_(True)
    head(x)[0].sum().backward()
    assert x.grad[0].abs().sum() > 0 and x.grad[1:].abs().sum() == 0


#  Strategies


def test_strategy_registry():
    assert STRATEGIES.names() == ["frozen", "full", "lora"]
    enc = create_image_encoder("resnet18", pretrained=False)
    with pytest.raises(UnknownNameError, match="known strategys: frozen, full, lora"):
        apply_strategy(enc, "partial")
    with pytest.raises(ConfigError, match="strategy 'frozen'"):
        apply_strategy(enc, "frozen", r=4)


def test_frozen_trunk_stays_in_eval_mode_without_grads():
    torch.manual_seed(0)
    enc = create_image_encoder("resnet18", pretrained=False, drop_rate=0.5)  # dropout and BatchNorm
    frozen = apply_strategy(enc, "frozen")
    assert isinstance(frozen, StrategyModule) and frozen.is_frozen and is_frozen(frozen)
    assert frozen.num_trainable == 0 and frozen.num_parameters == sum(p.numel() for p in enc.parameters())
    assert frozen.feature_dim == 512 and frozen.input_size == 224  # encoder attributes pass through
    model = nn.Sequential(frozen, nn.Linear(512, 8))
    model.train()  # what a training loop does every epoch
    assert model[1].training and frozen.training
    assert not any(m.training for m in enc.modules())
    bn = enc.trunk.bn1
    stats = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    x = torch.randn(4, 3, 64, 64)
    first, second = frozen(x), frozen(x)
    torch.testing.assert_close(first, second)  # dropout off
    torch.testing.assert_close(bn.running_mean, stats[0])  # BatchNorm statistics untouched
    torch.testing.assert_close(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]
    assert not first.requires_grad and frozen.forward_tokens(x).shape == (4, 4, 512)
    assert not any(p.requires_grad for p in model[0].parameters())
    model[1](first).sum().backward()  # the head still trains


def test_lora_on_vit_tiny_trains_only_the_adapters():
    torch.manual_seed(0)
    enc = create_image_encoder("vit_tiny", pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = enc(x)
    targets = lora_target_names(enc.trunk)
    assert len(targets) == 24 and "patch_embed.proj" not in targets  # qkv + attn.proj of 12 blocks, no conv
    lora = apply_strategy(enc, "lora")
    assert lora.strategy == "lora" and not lora.is_frozen and not is_frozen(lora)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # r 8 on 12 x (qkv 192->576 and proj 192->192): 12 * 8 * ((192 + 576) + (192 + 192)).
    assert lora.num_trainable == 12 * 8 * (768 + 384) == 110_592
    lora_module = enc.trunk.blocks[0].attn.qkv
    assert lora_module.r["default"] == 8 and lora_module.scaling["default"] == 16 / 8
    assert lora_module.lora_dropout["default"].p == 0.1
    lora.eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(x), before)  # LoRA's B starts at zero: same function at first
    lora.train()
    lora(x).sum().backward()
    grads = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert grads and grads <= set(trainable)


def test_lora_fails_clearly_on_a_trunk_without_attention():
    enc = create_image_encoder("resnet18", pretrained=False)
    with pytest.raises(ConfigError, match=r"trunk 'resnet18'.*has none; use strategy 'frozen' or 'full'"):
        apply_strategy(enc, "lora")


def test_full_trains_everything_and_wrappers_copy():
    enc = create_image_encoder("vit_tiny", pretrained=False)
    enc.requires_grad_(False)
    full = apply_strategy(enc, "full")
    assert full.num_trainable == full.num_parameters > 0 and not full.is_frozen
    full.train()
    assert enc.trunk.training
    frozen = apply_strategy(copy.deepcopy(enc), "frozen")
    clone = pickle.loads(pickle.dumps(frozen))  # Ray and DataLoader workers pickle modules
    assert clone.is_frozen and clone.feature_dim == 192 and not clone.module.training
    with pytest.raises(AttributeError):
        _ = clone.no_such_attribute
