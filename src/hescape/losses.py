"""Contrastive losses (CLIP, SigLIP) with gathering across ranks, and weight-decay parameter groups.

Both losses own their learnable parameters: ``logit_scale`` (log space, initialised to ln(1/T)) and,
for SigLIP, ``logit_bias``. Put the loss module inside the module that DDP (or Ray Train's
``prepare_model``) wraps, so that these gradients are averaged across ranks like every other one.

Distributed semantics
---------------------
When ``torch.distributed`` is initialised with more than one rank and ``gather=True``, each rank
all-gathers both embeddings with a gradient-carrying all-gather (its backward sums the gradients that
every rank's loss sends to each shard). The rank used for label offsets and for picking the local
shard's gradient is the *global* rank (``torch.distributed.get_rank()``), never a local rank, which
repeats on every node. With W ranks of equal shard size:

- the mean of the W ranks' losses equals the single-process loss on the concatenated batch (with
  ``local_loss=False`` every rank's loss equals it);
- each rank's gradient with respect to its own embeddings is W times the single-process gradient for
  those rows, so after DDP averages parameter gradients over the W ranks they equal the single-process
  gradients exactly (no 1/W shrinkage);
- the mean over ranks of the ``logit_scale`` / ``logit_bias`` gradients (what DDP computes) equals the
  single-process gradient.

``tests/test_losses.py`` checks each statement with a 2-process gloo run, including under DDP.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hescape.errors import ConfigError
from hescape.registry import Registry

__all__ = [
    "LOSSES",
    "ClipLoss",
    "ContrastiveLoss",
    "SigLipLoss",
    "create_loss",
    "gather_with_grad",
    "param_groups",
]

LOSSES: Registry[type[ContrastiveLoss]] = Registry("loss")


def create_loss(name: str, **kwargs) -> ContrastiveLoss:
    """Build the loss registered under ``name`` (``"clip"`` or ``"siglip"``) with ``kwargs``."""
    return LOSSES.create(name, **kwargs)


# --------------------------------------------------------------------------------------------------
# Gathering across ranks


def _rank_and_world(gather: bool) -> tuple[int, int]:
    """(global rank, world size) of the default process group, or (0, 1) when not gathering."""
    if gather and dist.is_available() and dist.is_initialized():
        # Global rank on purpose: LOCAL_RANK repeats on every node and would misplace the labels.
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather of equally sized tensors into a (world, *shape) stack; the backward pass sums the
    gradient every rank computed for each slot and hands each rank the sum for its own slot."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        ctx.rank = rank
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Clone: all_reduce works in place and the incoming gradient may be shared with other nodes.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank], None, None


def _shard_sizes(n: int, world: int, device: torch.device) -> list[int]:
    """Every rank's number of rows, so that uneven shards (a last partial batch) still line up."""
    local = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local)
    return [int(s) for s in torch.cat(sizes).tolist()]


def gather_with_grad(tensor: torch.Tensor, rank: int, world: int, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order, keeping the gradient path.

    Parameters
    ----------
    tensor
        This rank's rows, shape (sizes[rank], ...).
    rank, world
        Global rank and world size of the default process group.
    sizes
        Number of rows on each rank (from every rank, in rank order); shards are padded to the
        largest for the collective and trimmed afterwards.

    Returns
    -------
    torch.Tensor
        Shape (sum(sizes), ...). Its backward pass sums, over all ranks, the gradient sent to this
        rank's rows, so losses computed independently on each rank train every shard correctly.
    """
    largest = max(sizes)
    pad = largest - tensor.shape[0]
    if pad:
        tensor = torch.cat([tensor, tensor.new_zeros((pad, *tensor.shape[1:]))])
    stacked = _AllGatherWithGrad.apply(tensor, rank, world)
    if all(size == largest for size in sizes):
        return stacked.flatten(0, 1)
    return torch.cat([stacked[r, :size] for r, size in enumerate(sizes)])


# --------------------------------------------------------------------------------------------------
# Losses


class ContrastiveLoss(nn.Module):
    """Base of the image-gene contrastive losses: owns the learnable logit scale.

    Parameters
    ----------
    temperature
        Initial temperature T; ``logit_scale`` starts at ln(1/T) (0.07 as in CLIP and HESCAPE).
    max_logit_scale
        Upper bound of exp(logit_scale) (100, as in CLIP).
    normalize
        L2-normalise both embeddings before the similarity (standard CLIP). ``False`` reproduces the
        reference HESCAPE code, which feeds unnormalised embeddings to the loss.
    gather
        When ``torch.distributed`` is initialised with world size > 1, contrast against the
        embeddings of all ranks. Every rank must then call ``forward`` together (it is a collective);
        use ``logits`` or ``gather=False`` for single-rank work such as evaluation.
    local_loss
        With gathering, compute only this rank's rows of the global logit matrix (n x N instead of
        N x N). Same gradients after averaging over ranks; the per-rank loss values differ and their
        mean is the global loss. Without gathering it has no effect.

    Notes
    -----
    The scale is clamped in log space, ``exp(min(logit_scale, ln(max_logit_scale)))``, so it never
    exceeds ``max_logit_scale`` (to float precision). A purely functional clamp would leave a
    parameter that went above the bound with zero gradient for good; so in training mode ``scale()``
    (hence ``forward``) also projects the stored value back onto the bound (what open_clip does after
    each optimizer step, done here so that no training loop can forget it). At the bound itself the
    gradient still flows, so the scale can decrease again. The projection writes through ``.data`` so
    that it never invalidates an autograd graph that is still waiting for its backward pass.

    Gathering first exchanges the shard sizes (one small collective, and a host sync, per call) so
    that uneven shards such as a last partial batch line up; with equal shards the rest is one
    all-gather per gathered embedding.

    Embeddings of half precision are promoted to float32 and the loss runs outside autocast: the
    logits of up to 100 x cosine similarity need more than bf16's 8 bits of mantissa.
    """

    no_weight_decay_names: tuple[str, ...] = ("logit_scale",)

    def __init__(
        self,
        temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        normalize: bool = True,
        gather: bool = True,
        local_loss: bool = True,
    ):
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"loss temperature must be > 0, got {temperature}")
        if not max_logit_scale > 0:
            raise ConfigError(f"max_logit_scale must be > 0, got {max_logit_scale}")
        self.max_logit_scale = float(max_logit_scale)
        self.normalize = bool(normalize)
        self.gather = bool(gather)
        self.local_loss = bool(local_loss)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def extra_repr(self) -> str:
        return (
            f"max_logit_scale={self.max_logit_scale}, normalize={self.normalize}, gather={self.gather}, "
            f"local_loss={self.local_loss}"
        )

    def no_weight_decay_parameter_names(self) -> set[str]:
        """Names (relative to this module) of parameters that must not be weight-decayed."""
        return set(self.no_weight_decay_names)

    @property
    def max_log_scale(self) -> float:
        return math.log(self.max_logit_scale)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped so that it is at most ``max_logit_scale``."""
        bound = self.max_log_scale
        if self.training and self.logit_scale.requires_grad:
            with torch.no_grad():
                self.logit_scale.data.clamp_(max=bound)
        # Not Tensor.clamp: its gradient is zero at the bound itself, which would freeze a scale
        # that was projected onto it; torch.where keeps the gradient at and below the bound.
        scale = self.logit_scale
        return torch.where(scale <= bound, scale, torch.full_like(scale, bound)).exp()

    def bias(self) -> torch.Tensor | None:
        """Additive logit bias (SigLIP), or ``None``."""
        return None

    def prepare(self, emb: torch.Tensor) -> torch.Tensor:
        """The embedding as the loss sees it: float32 or wider, L2-normalised when ``normalize``."""
        if emb.dtype in (torch.float16, torch.bfloat16):
            emb = emb.float()
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def logits(self, image_emb: torch.Tensor, gene_emb: torch.Tensor) -> torch.Tensor:
        """Image x gene logits of local embeddings (no gathering): scale * similarity (+ bias).

        For evaluation and inspection: row i scores image i against every gene embedding, with the
        same normalisation, scale and bias as the training loss.
        """
        with torch.autocast(device_type=image_emb.device.type, enabled=False):
            out = self.scale() * self.prepare(image_emb) @ self.prepare(gene_emb).T
            bias = self.bias()
            return out if bias is None else out + bias

    def forward(self, image_emb: torch.Tensor, gene_emb: torch.Tensor) -> torch.Tensor:
        """Scalar loss of paired embeddings (row i of each is the same spot), shapes (n, d)."""
        if image_emb.ndim != 2 or image_emb.shape != gene_emb.shape:
            raise ValueError(
                f"expected paired (n, d) embeddings, got {tuple(image_emb.shape)} and {tuple(gene_emb.shape)}"
            )
        with torch.autocast(device_type=image_emb.device.type, enabled=False):
            image, gene = self.prepare(image_emb), self.prepare(gene_emb)
            rank, world = _rank_and_world(self.gather)
            sizes = [image.shape[0]] if world == 1 else _shard_sizes(image.shape[0], world, image.device)
            return self._loss(image, gene, self.scale(), rank, world, sizes)

    def _loss(self, image, gene, scale, rank: int, world: int, sizes: list[int]) -> torch.Tensor:
        raise NotImplementedError


def _gather(tensor: torch.Tensor, rank: int, world: int, sizes: list[int]) -> torch.Tensor:
    # Module-level indirection so that the tests can substitute a gradient-dropping gather and
    # prove that the distributed test notices.
    return gather_with_grad(tensor, rank, world, sizes) if world > 1 else tensor


@LOSSES.register("clip")
class ClipLoss(ContrastiveLoss):
    """Symmetric InfoNCE (CLIP): mean of image->gene and gene->image cross-entropies over the global
    batch; the positives are the pairs on the diagonal.

    Parameters are those of :class:`ContrastiveLoss`.
    """

    def _loss(self, image, gene, scale, rank, world, sizes):
        all_image, all_gene = _gather(image, rank, world, sizes), _gather(gene, rank, world, sizes)
        if world > 1 and self.local_loss:
            # This rank's rows of both logit matrices; its pairs sit after the rows of lower ranks.
            offset = sum(sizes[:rank])
            labels = torch.arange(offset, offset + image.shape[0], device=image.device)
            per_image = scale * image @ all_gene.T
            per_gene = scale * gene @ all_image.T
        else:
            labels = torch.arange(all_image.shape[0], device=image.device)
            per_image = scale * all_image @ all_gene.T
            per_gene = per_image.T
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_gene, labels)) / 2


@LOSSES.register("siglip")
class SigLipLoss(ContrastiveLoss):
    """Pairwise sigmoid loss (SigLIP): -sum log sigmoid(t_ij * (scale * s_ij + bias)) / n, t = +1 on
    the diagonal and -1 elsewhere, with a learnable bias.

    Parameters
    ----------
    bias_init
        Initial ``logit_bias`` (-10, as in SigLIP and HESCAPE).
    **kwargs
        Those of :class:`ContrastiveLoss`.

    Notes
    -----
    Distributed, each rank scores its own images against the gene embeddings of all ranks (all
    negatives) and divides by its own batch size, as open_clip does; the mean over ranks is then the
    single-process loss of the whole batch. The gathered gene matrix is small (N x 128), so it is
    gathered whole rather than exchanged in chunks between neighbours.
    """

    no_weight_decay_names = ("logit_scale", "logit_bias")

    def __init__(self, bias_init: float = -10.0, **kwargs):
        super().__init__(**kwargs)
        self.logit_bias = nn.Parameter(torch.tensor(float(bias_init)))

    def bias(self) -> torch.Tensor:
        return self.logit_bias

    def _loss(self, image, gene, scale, rank, world, sizes):
        all_gene = _gather(gene, rank, world, sizes)
        if world > 1 and not self.local_loss:
            image, offset = _gather(image, rank, world, sizes), 0
        else:
            offset = sum(sizes[:rank])
        n = image.shape[0]
        logits = scale * image @ all_gene.T + self.logit_bias
        signs = -torch.ones_like(logits)
        rows = torch.arange(n, device=logits.device)
        signs[rows, rows + offset] = 1.0
        return -F.logsigmoid(signs * logits).sum() / n


# --------------------------------------------------------------------------------------------------
# Weight-decay groups


def _declared_no_decay(model: nn.Module) -> set[str]:
    """Full names of parameters that modules declare exempt from weight decay: our
    ``no_weight_decay_parameter_names()`` and timm's ``no_weight_decay()`` (pos_embed, cls_token)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        for method in ("no_weight_decay_parameter_names", "no_weight_decay"):
            declared = getattr(module, method, None)
            if callable(declared):
                names.update(f"{prefix}.{name}" if prefix else name for name in declared())
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of ``model`` into a decayed and a non-decayed group.

    No weight decay for: parameters with at most one dimension (biases, norm weights and biases, the
    scalar logit scale and bias) and parameters that a submodule names in
    ``no_weight_decay_parameter_names()`` or timm's ``no_weight_decay()``. Frozen parameters
    (``requires_grad=False``) are left out.

    Parameters
    ----------
    model
        Any module, e.g. the dual encoder with its loss attached.
    weight_decay
        Decay of the decayed group.

    Returns
    -------
    list of dict
        Optimizer parameter groups (``{"params", "weight_decay"}``), decayed first; a group with no
        parameters is omitted.

    Examples
    --------
    >>> opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-5)  # doctest: +SKIP
    """
    exempt = _declared_no_decay(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
