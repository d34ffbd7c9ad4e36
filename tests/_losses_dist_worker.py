"""Cases shared by tests/test_losses.py and its 2-process gloo worker (run as a script per rank).

``run_cases(data, rank, world)`` computes every case on this rank's shard of the batch and returns
losses and gradients; the test calls it once in-process (world 1, whole batch) and compares with
what each worker wrote.

    python tests/_losses_dist_worker.py RANK WORLD PORT INPUT.pt OUTPUT.pt
"""

from __future__ import annotations

import contextlib
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from hescape import losses

N, D, D_IN = 8, 16, 12  # global batch, embedding dim, tower input dim
UNEVEN = (5, 3)  # rows per rank in the uneven-shard cases

# name -> (loss name, kwargs, mode, shard sizes or None for equal halves)
CASES = {
    "clip-local": ("clip", {"local_loss": True}, "normal", None),
    "clip-global": ("clip", {"local_loss": False}, "normal", None),
    "siglip-local": ("siglip", {"local_loss": True, "bias_init": -2.0}, "normal", None),
    "siglip-global": ("siglip", {"local_loss": False, "bias_init": -2.0}, "normal", None),
    "siglip-default-bias": ("siglip", {}, "normal", None),
    "clip-unnormalised": ("clip", {"normalize": False}, "normal", None),
    "clip-global-uneven": ("clip", {"local_loss": False}, "normal", UNEVEN),
    "clip-local-uneven": ("clip", {"local_loss": True}, "normal", UNEVEN),
    "siglip-local-uneven": ("siglip", {"local_loss": True, "bias_init": -2.0}, "normal", UNEVEN),
    # Deliberate bugs, to prove that the comparison can fail.
    "clip-local-wrong-rank": ("clip", {"local_loss": True}, "wrong_rank", None),
    "siglip-local-wrong-rank": ("siglip", {"local_loss": True, "bias_init": -2.0}, "wrong_rank", None),
    "clip-local-no-grad-gather": ("clip", {"local_loss": True}, "no_grad_gather", None),
    "clip-global-no-grad-gather": ("clip", {"local_loss": False}, "no_grad_gather", None),
    "siglip-local-no-grad-gather": ("siglip", {"local_loss": True, "bias_init": -2.0}, "no_grad_gather", None),
}
DDP_CASES = ("clip", "siglip")


def make_data(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(N, D, generator=g, dtype=torch.float64),
        "gene": torch.randn(N, D, generator=g, dtype=torch.float64),
        "image_in": torch.randn(N, D_IN, generator=g, dtype=torch.float64),
        "gene_in": torch.randn(N, D_IN, generator=g, dtype=torch.float64),
    }


def shard(x: torch.Tensor, rank: int, world: int, sizes=None) -> torch.Tensor:
    if world == 1:
        return x
    sizes = sizes or [x.shape[0] // world] * world
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


def _no_grad_gather(tensor, rank, world, sizes):
    """open_clip's gather_with_grad=False: other ranks' rows are constants, only the local slot
    carries a gradient (equal sizes only)."""
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[rank] = tensor
    return torch.cat(parts)


@contextlib.contextmanager
def bug(mode: str, monkey_world: int):
    """Patch hescape.losses with a deliberate bug for the duration of one case."""
    saved = losses._rank_and_world, losses._gather
    if mode == "wrong_rank":
        # What LOCAL_RANK gives on two single-GPU nodes: both ranks believe they are rank 0.
        losses._rank_and_world = lambda gather: (0, monkey_world)
    elif mode == "no_grad_gather":
        losses._gather = lambda t, r, w, s: _no_grad_gather(t, r, w, s) if w > 1 else t
    try:
        yield
    finally:
        losses._rank_and_world, losses._gather = saved


def _grad(t: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros(()) if t is None else t.detach().clone()


def run_cases(data: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for case, (name, kwargs, mode, sizes) in CASES.items():
        if world == 1 and mode != "normal":
            continue
        loss_fn = losses.create_loss(name, **kwargs).double()
        image = shard(data["image"], rank, world, sizes).clone().requires_grad_(True)
        gene = shard(data["gene"], rank, world, sizes).clone().requires_grad_(True)
        with bug(mode, world):
            loss = loss_fn(image, gene)
            loss.backward()
        out[f"{case}/loss"] = loss.detach()
        out[f"{case}/image_grad"] = _grad(image.grad)
        out[f"{case}/gene_grad"] = _grad(gene.grad)
        out[f"{case}/scale_grad"] = _grad(loss_fn.logit_scale.grad)
        if name == "siglip":
            out[f"{case}/bias_grad"] = _grad(loss_fn.logit_bias.grad)
    for name in DDP_CASES:
        torch.manual_seed(1)  # the same tower weights in every process
        model = TwoTowers(name).double()
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model)
        loss = model(shard(data["image_in"], rank, world), shard(data["gene_in"], rank, world))
        loss.backward()
        module = model.module if world > 1 else model
        out[f"ddp-{name}/loss"] = loss.detach()
        for pname, param in module.named_parameters():
            out[f"ddp-{name}/{pname}"] = _grad(param.grad)
    return out


class TwoTowers(nn.Module):
    """Two linear towers and the loss in one module, as the training code wraps them for DDP."""

    def __init__(self, loss: str):
        super().__init__()
        self.image = nn.Linear(D_IN, D)
        self.gene = nn.Linear(D_IN, D)
        self.loss = losses.create_loss(loss, local_loss=True)

    def forward(self, image_in, gene_in):
        return self.loss(self.image(image_in), self.gene(gene_in))


def main(argv: list[str]) -> int:
    rank, world, port = int(argv[0]), int(argv[1]), int(argv[2])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        data = torch.load(argv[3], weights_only=True)
        torch.save(run_cases(data, rank, world), argv[4])
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
