"""CLIP and SigLIP losses: agreement with open_clip, normalisation, the scale clamp, weight-decay groups,
the registry, and a 2-process gloo run against the single-process computation on the whole batch."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import _losses_dist_worker as worker
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hescape.errors import ConfigError, UnknownNameError
from hescape.losses import LOSSES, ClipLoss, SigLipLoss, create_loss, param_groups

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _inputs(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def _leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


# --------------------------------------------------------------------------------------------------
# Agreement with open_clip (features normalised by us, logit scale exp'd as open_clip's models do)


@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), 0.3])
def test_clip_matches_open_clip(log_scale):
    from open_clip.loss import ClipLoss as RefClipLoss

    image, gene = _inputs()
    loss_fn = create_loss("clip")
    with torch.no_grad():
        loss_fn.logit_scale.fill_(log_scale)
    x, y = _leaves(image, gene)
    loss = loss_fn(x, y)
    loss.backward()

    rx, ry = _leaves(image, gene)
    ref_log_scale = torch.tensor(log_scale, requires_grad=True)
    ref = RefClipLoss()(F.normalize(rx, dim=-1), F.normalize(ry, dim=-1), ref_log_scale.exp())
    ref.backward()

    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(x.grad, rx.grad, **TOL)
    torch.testing.assert_close(y.grad, ry.grad, **TOL)
    torch.testing.assert_close(loss_fn.logit_scale.grad, ref_log_scale.grad, **TOL)
    assert x.grad.abs().max() > 1e-3 and ref_log_scale.grad.abs() > 1e-4  # a non-trivial comparison


@pytest.mark.parametrize(("log_scale", "bias"), [(math.log(1 / 0.07), -10.0), (math.log(10.0), -2.0)])
def test_siglip_matches_open_clip(log_scale, bias):
    from open_clip.loss import SigLipLoss as RefSigLipLoss

    image, gene = _inputs()
    loss_fn = create_loss("siglip", bias_init=bias)
    with torch.no_grad():
        loss_fn.logit_scale.fill_(log_scale)
    x, y = _leaves(image, gene)
    loss = loss_fn(x, y)
    loss.backward()

    rx, ry = _leaves(image, gene)
    ref_log_scale = torch.tensor(log_scale, requires_grad=True)
    ref_bias = torch.tensor(bias, requires_grad=True)
    ref = RefSigLipLoss()(F.normalize(rx, dim=-1), F.normalize(ry, dim=-1), ref_log_scale.exp(), ref_bias)
    ref.backward()

    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(x.grad, rx.grad, **TOL)
    torch.testing.assert_close(y.grad, ry.grad, **TOL)
    torch.testing.assert_close(loss_fn.logit_scale.grad, ref_log_scale.grad, **TOL)
    torch.testing.assert_close(loss_fn.logit_bias.grad, ref_bias.grad, **TOL)
    assert loss_fn.logit_bias.grad.abs() > 1e-3


def test_default_init_follows_protocol():
    clip, siglip = create_loss("clip"), create_loss("siglip")
    for loss_fn in (clip, siglip):
        assert loss_fn.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
        assert loss_fn.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
        assert loss_fn.normalize and loss_fn.gather
    assert siglip.logit_bias.item() == -10.0
    assert create_loss("clip", temperature=0.5).scale().item() == pytest.approx(2.0)


# --------------------------------------------------------------------------------------------------
# Unnormalised option (the reference code's behaviour)


def test_unnormalised_is_the_raw_computation():
    image, gene = _inputs()
    image, gene = 3 * image, 0.5 * gene  # norms far from 1, so normalising matters
    scale = 1 / 0.07

    clip_raw = create_loss("clip", normalize=False)(image, gene)
    logits = scale * image @ gene.T
    labels = torch.arange(len(image))
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(clip_raw, expected, **TOL)
    assert not torch.allclose(clip_raw, create_loss("clip")(image, gene), rtol=1e-2)

    siglip_raw = create_loss("siglip", normalize=False)(image, gene)
    signs = 2 * torch.eye(len(image)) - 1
    expected = -F.logsigmoid(signs * (scale * image @ gene.T - 10.0)).sum() / len(image)
    torch.testing.assert_close(siglip_raw, expected, **TOL)
    assert not torch.allclose(siglip_raw, create_loss("siglip")(image, gene), rtol=1e-2)


def test_logits_use_the_scale_and_the_bias():
    image, gene = _inputs(n=5)
    siglip = create_loss("siglip", bias_init=-3.0)
    expected = siglip.scale() * F.normalize(image, dim=-1) @ F.normalize(gene, dim=-1).T - 3.0
    torch.testing.assert_close(siglip.logits(image, gene), expected)
    clip = create_loss("clip", normalize=False)
    torch.testing.assert_close(clip.logits(image, gene), clip.scale() * image @ gene.T)


def test_half_precision_is_computed_in_float32():
    image, gene = _inputs()
    loss_fn = create_loss("clip")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(image.bfloat16(), gene.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, loss_fn(image.bfloat16().float(), gene.bfloat16().float()))


def test_bad_shapes_and_config():
    loss_fn = create_loss("clip")
    with pytest.raises(ValueError, match="paired"):
        loss_fn(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ConfigError, match="temperature"):
        create_loss("siglip", temperature=0.0)


# --------------------------------------------------------------------------------------------------
# Clamp of the logit scale


def test_scale_is_clamped_at_100_and_the_parameter_projected():
    loss_fn = create_loss("clip")
    bound = math.log(100.0)
    with torch.no_grad():
        loss_fn.logit_scale.fill_(bound + 1.0)

    loss_fn.eval()  # evaluation never changes the parameter, but still clamps the value used
    assert loss_fn.scale().item() == pytest.approx(100.0, rel=1e-6)
    assert loss_fn.logit_scale.item() == pytest.approx(bound + 1.0)

    loss_fn.train()
    image, gene = _inputs()
    loss = loss_fn(image, gene)
    assert loss_fn.logit_scale.item() == pytest.approx(bound)  # projected back onto the bound
    loss.backward()
    # At the bound the gradient still flows, so the scale can come down again.
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad.abs() > 0


def test_projection_does_not_break_a_pending_graph():
    # Two forwards before one backward (e.g. two views): projecting in the second must not
    # invalidate the first graph.
    loss_fn = create_loss("siglip", temperature=0.001)  # starts above the bound
    image, gene = _inputs()
    total = loss_fn(image, gene) + loss_fn(gene, image)
    total.backward()
    assert loss_fn.scale().item() == pytest.approx(100.0, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Weight-decay groups


class _TimmLike(nn.Module):
    """A module declaring timm-style exemptions (pos_embed is 3-d, so only the declaration exempts it)."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.ones(1, 4, 8))
        self.proj = nn.Linear(8, 8)

    def no_weight_decay(self):
        return {"pos_embed"}


def test_param_groups_exempt_scale_bias_norms_and_declared():
    model = nn.ModuleDict(
        {
            "trunk": _TimmLike(),
            "head": nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
            "frozen": nn.Linear(8, 8),
            "loss": SigLipLoss(),
        }
    )
    model["frozen"].requires_grad_(False)
    assert model["loss"].no_weight_decay_parameter_names() == {"logit_scale", "logit_bias"}
    assert ClipLoss().no_weight_decay_parameter_names() == {"logit_scale"}

    decay, no_decay = param_groups(model, weight_decay=0.01)
    ids = {id(p): name for name, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert sorted(ids[id(p)] for p in decay["params"]) == ["head.0.weight", "trunk.proj.weight"]
    assert sorted(ids[id(p)] for p in no_decay["params"]) == [
        "head.0.bias",
        "head.1.bias",
        "head.1.weight",
        "loss.logit_bias",
        "loss.logit_scale",
        "trunk.pos_embed",
        "trunk.proj.bias",
    ]

    # Behaviour, not bookkeeping: with zero gradients AdamW only applies decay, and it leaves the
    # scale and bias alone.
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    assert torch.equal(model["loss"].logit_scale, before["loss.logit_scale"])
    assert torch.equal(model["loss"].logit_bias, before["loss.logit_bias"])
    assert not torch.equal(model["head"][0].weight, before["head.0.weight"])


# --------------------------------------------------------------------------------------------------
# Registry


def test_registry_names_and_unknown_name():
    assert LOSSES.names() == ["clip", "siglip"]
    assert isinstance(create_loss("clip"), ClipLoss) and isinstance(create_loss("siglip"), SigLipLoss)
    with pytest.raises(UnknownNameError, match="clip, siglip") as err:
        create_loss("infonce")
    assert "infonce" in str(err.value)


# --------------------------------------------------------------------------------------------------
# Two gloo processes, each with half the batch, against one process with the whole batch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each rank's results from the gloo run, and the single-process results on the whole batch."""
    tmp = tmp_path_factory.mktemp("dist")
    data = worker.make_data()
    torch.save(data, tmp / "input.pt")
    # LOCAL_RANK=0 on both, as on two single-GPU nodes: the loss must take the global rank instead.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0"}
    port = _free_port()
    script = Path(worker.__file__)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), "2", str(port), str(tmp / "input.pt"), str(tmp / f"{rank}.pt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log}"
    ranks = [torch.load(tmp / f"{rank}.pt", weights_only=True) for rank in range(2)]
    return ranks, worker.run_cases(data, 0, 1)


def _mismatches(ranks, single, case, ref_case=None) -> list[str]:
    """Quantities of a 2-rank ``case`` that differ from the single-process ``ref_case``.

    What must match, with W = 2 equal shards and gradient-carrying gathers:
    - mean over ranks of the loss == single loss (``local_loss=False``: each rank's loss == it);
    - concat over ranks of each rank's input gradient, divided by W == single input gradient (so that
      DDP's average over ranks of parameter gradients is the single-process gradient);
    - mean over ranks of the logit scale / bias gradients (DDP's average) == single gradient.
    With uneven shards (n_r rows on rank r): the global loss (each rank) is unchanged; the local loss
    and the scale/bias gradients match as the n_r-weighted mean; input gradients only for the global
    loss, where every rank's loss is the same function of all rows.
    """
    ref_case = ref_case or case
    _, kwargs, _, sizes = worker.CASES[case]
    world, local = len(ranks), kwargs.get("local_loss", True)
    sizes = sizes or [worker.N // world] * world
    weights = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)

    def get(quantity):
        return [r[f"{case}/{quantity}"] for r in ranks], single[f"{ref_case}/{quantity}"]

    checks = {}
    losses, ref = get("loss")
    checks["loss"] = (sum(w * v for w, v in zip(weights, losses, strict=True)), ref)
    if not local:
        checks.update({f"loss[{r}]": (v, ref) for r, v in enumerate(losses)})
    if not local or len(set(sizes)) == 1:
        for quantity in ("image_grad", "gene_grad"):
            per_rank, ref = get(quantity)
            checks[quantity] = (torch.cat(per_rank) / world, ref)
    for quantity in ("scale_grad", "bias_grad"):
        if f"{ref_case}/{quantity}" in single:
            per_rank, ref = get(quantity)
            checks[quantity] = (sum(w * v for w, v in zip(weights, per_rank, strict=True)), ref)
    return [q for q, (got, want) in checks.items() if not torch.allclose(got, want, rtol=1e-9, atol=1e-10)]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c, spec in worker.CASES.items() if spec[2] == "normal"])
def test_two_ranks_match_one_process_on_the_whole_batch(two_ranks, case):
    ranks, single = two_ranks
    assert _mismatches(ranks, single, case) == []
    assert single[f"{case}/image_grad"].abs().max() > 1e-4  # gradients are non-trivial


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "ref_case", "expected"),
    [
        # Both ranks using offset 0 (what LOCAL_RANK gives on two nodes): rank 1's labels point at
        # rank 0's rows, so the loss and everything after it changes.
        ("clip-local-wrong-rank", "clip-local", {"loss", "image_grad", "gene_grad", "scale_grad"}),
        # (The SigLIP bias gradient, sum(sigmoid(z)) - #positives, does not depend on where the
        # positives are, so it cannot notice.)
        ("siglip-local-wrong-rank", "siglip-local", {"loss", "image_grad", "gene_grad", "scale_grad"}),
        # Gathers that drop the other ranks' gradient: the same loss, wrong input gradients.
        ("clip-local-no-grad-gather", "clip-local", {"image_grad", "gene_grad"}),
        ("clip-global-no-grad-gather", "clip-global", {"image_grad", "gene_grad"}),
        # SigLIP gathers only gene embeddings; image rows appear in their own rank's loss alone.
        ("siglip-local-no-grad-gather", "siglip-local", {"gene_grad"}),
    ],
)
def test_the_comparison_catches_wrong_rank_and_dropped_gradients(two_ranks, case, ref_case, expected):
    ranks, single = two_ranks
    assert set(_mismatches(ranks, single, case, ref_case)) == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", worker.DDP_CASES)
def test_ddp_gradients_equal_single_process_gradients(two_ranks, name):
    ranks, single = two_ranks
    keys = [k for k in single if k.startswith(f"ddp-{name}/") and not k.endswith("/loss")]
    assert {k.split("/")[1] for k in keys} >= {"image.weight", "gene.weight", "loss.logit_scale"}
    for key in keys:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)  # DDP synchronised
        torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-9, atol=1e-10)
    mean_loss = (ranks[0][f"ddp-{name}/loss"] + ranks[1][f"ddp-{name}/loss"]) / 2
    torch.testing.assert_close(mean_loss, single[f"ddp-{name}/loss"], rtol=1e-9, atol=1e-10)
