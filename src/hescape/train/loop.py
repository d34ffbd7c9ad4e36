"""The one training loop: AdamW, linear warm-up + cosine, gradient clipping, bf16 autocast on GPU,
early stopping on the validation loss, a checkpoint every epoch, resume from the latest one.

``train_worker(config)`` is the per-worker function that Ray Train runs on every worker (and that
``hescape tune`` reuses for each trial); ``run_local(config)`` runs it in this process alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hescape.config import from_dict
from hescape.data.image_transforms import AugmentConfig, augment_patch
from hescape.train.config import TrainConfig
from hescape.train.context import LocalContext, RayContext, WorkerContext

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
INFO_FILE = "checkpoint.json"


#  Data


class PairDataset(Dataset):
    """Index -> (image input, gene input). Image input is a uint8 patch (augmented per sample when
    training) or a cached feature row; gene input is a transformed-count row, token row or feature row."""

    def __init__(self, images: np.ndarray, genes: np.ndarray, *, augment: AugmentConfig | None = None,
                 seed: int = 0):
        if len(images) != len(genes):
            raise ValueError(f"{len(images)} image rows but {len(genes)} gene rows")
        self.images, self.genes, self.augment, self.seed = images, genes, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]):
        idx = np.asarray(indices)
        if self.augment is not None:
            # One generator per (seed, epoch, sample): every sample draws its own parameters, and a
            # resumed run sees the same augmentations as an uninterrupted one.
            imgs = torch.stack([augment_patch(self.images[i], np.random.default_rng([self.seed, self.epoch, int(i)]),
                                              self.augment) for i in idx])
        else:
            imgs = torch.from_numpy(np.array(self.images[idx]))
        genes = torch.from_numpy(np.array(self.genes[idx]))
        return imgs, genes

    def __getitem__(self, i: int):
        return self.__getitems__([i])


def _collate(batch):
    return batch  # __getitems__ already returns stacked tensors


#  Model


def build_model(cfg: TrainConfig, spec: dict):
    """Build the :class:`~hescape.models.dual_encoder.DualEncoder` a worker trains.

    ``spec`` says what the data provide: ``n_genes``, ``image_feature_dim`` (set when image trunk
    features are cached), ``gene_feature_dim`` (set when gene features are cached, i.e. a frozen
    gene encoder).
    """
    from hescape.data.image_transforms import ImageNorm
    from hescape.losses import create_loss
    from hescape.models.dual_encoder import DualEncoder
    from hescape.models.gene_encoders import create_gene_encoder
    from hescape.models.heads import create_head
    from hescape.models.image_encoders import create_image_encoder
    from hescape.models.strategies import apply_strategy

    image_trunk, norm = None, None
    if spec.get("image_feature_dim") is None:
        encoder = create_image_encoder(cfg.image_encoder, pretrained=cfg.pretrained, weights_dir=cfg.weights_dir,
                                       **cfg.image_encoder_kwargs)
        norm = ImageNorm(input_size=spec.get("image_input_size") or encoder.input_size, mean=tuple(encoder.mean),
                         std=tuple(encoder.std))
        image_trunk = apply_strategy(encoder, cfg.strategy)
        image_dim = encoder.feature_dim
    else:
        image_dim = int(spec["image_feature_dim"])
    # Seed the trainable parts after the image trunk is built (building it draws random numbers),
    # so heads and gene encoder start identical whether trunk features are cached or recomputed.
    torch.manual_seed(cfg.seed)
    gene_trunk = None
    if spec.get("gene_feature_dim") is None:
        gene_trunk = create_gene_encoder(cfg.gene_encoder, spec["n_genes"], **cfg.gene_encoder_kwargs)
        gene_dim = gene_trunk.feature_dim
    else:
        gene_dim = int(spec["gene_feature_dim"])
    head_kw = {"hidden": cfg.head_hidden, "dropout": cfg.head_dropout}
    return DualEncoder(
        image_trunk=image_trunk,
        gene_trunk=gene_trunk,
        image_head=create_head(cfg.image_head, image_dim, cfg.embed_dim, **head_kw),
        gene_head=create_head(cfg.gene_head, gene_dim, cfg.embed_dim, **head_kw),
        loss=create_loss(cfg.loss, temperature=cfg.temperature, normalize=cfg.normalize),
        image_norm=norm,
        image_trunk_frozen=cfg.strategy == "frozen",
    )


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up to 1, then cosine to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


#  Evaluation inside training


def embed_split(model, images: np.ndarray, genes: np.ndarray, *, rank: int, world_size: int, batch_size: int,
                device) -> tuple[np.ndarray, np.ndarray]:
    """Embed a whole split with every rank taking a contiguous slice; gathered in order on all ranks."""
    n = len(images)
    per_rank = math.ceil(n / world_size)
    lo, hi = min(n, rank * per_rank), min(n, (rank + 1) * per_rank)
    img_out, gene_out = [], []
    model.eval()
    with torch.no_grad():
        for start in range(lo, hi, batch_size):
            stop = min(hi, start + batch_size)
            img = torch.from_numpy(np.array(images[start:stop])).to(device)  # copies off read-only memmaps
            gene = torch.from_numpy(np.array(genes[start:stop])).to(device)
            img_out.append(model.encode_image(img).float())
            gene_out.append(model.encode_gene(gene).float())
    img_local = torch.cat(img_out) if img_out else None
    gene_local = torch.cat(gene_out) if gene_out else None
    if world_size == 1:
        return img_local.cpu().numpy(), gene_local.cpu().numpy()
    # Pad each rank's slice to the same length for all_gather, then trim.
    emb_dim = torch.tensor([img_local.shape[1] if img_local is not None else 0], device=device)
    dist.all_reduce(emb_dim, op=dist.ReduceOp.MAX)
    d = int(emb_dim.item())

    def gather(local):
        buf = torch.zeros(per_rank, d, device=device)
        if local is not None:
            buf[: len(local)] = local
        parts = [torch.zeros_like(buf) for _ in range(world_size)]
        dist.all_gather(parts, buf)
        return torch.cat(parts)[:n].cpu().numpy()

    return gather(img_local), gather(gene_local)


def validation_metrics(loss_module, img: np.ndarray, gene: np.ndarray, *, global_batch: int,
                       normalize: bool) -> dict[str, float]:
    """Validation loss over global batches of a fixed shuffle of the split (batches drawn like the
    training batches; in dataset order they would hold neighbouring spots of one slide, a harder and
    different objective) and global retrieval R@5 both ways (the tuning objective), on the whole
    validation split."""
    from hescape.evaluate.retrieval import global_retrieval

    order = np.random.default_rng(0).permutation(len(img))
    img_shuffled, gene_shuffled = img[order], gene[order]
    losses, weights = [], []
    device = loss_module.logit_scale.device
    gather, loss_module.gather = loss_module.gather, False  # the whole split is already on this rank
    try:
        with torch.no_grad():
            for start in range(0, len(img), global_batch):
                a = torch.from_numpy(img_shuffled[start:start + global_batch]).to(device)
                b = torch.from_numpy(gene_shuffled[start:start + global_batch]).to(device)
                if len(a) < 2:
                    continue
                losses.append(float(loss_module(a, b)))
                weights.append(len(a))
    finally:
        loss_module.gather = gather
    ret = global_retrieval(img, gene, normalize=normalize)
    return {
        "val_loss": float(np.average(losses, weights=weights)),
        "val_i2g_R_at_5": ret["I2G"]["R@5"],
        "val_g2i_R_at_5": ret["G2I"]["R@5"],
        "val_R_at_5": 0.5 * (ret["I2G"]["R@5"] + ret["G2I"]["R@5"]),
        "val_chance_R_at_5": ret["I2G"]["chance_R@5"],
    }


#  Tracking from rank 0


class MetricBuffer:
    """Buffers step metrics and writes them to MLflow in one batch per epoch (SQLite stores pay
    ~0.2 s per call, too slow for every step)."""

    def __init__(self, tracking: dict | None):
        self.client, self.run_id, self.rows = None, None, []
        if tracking and tracking.get("run_id"):
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking.get("uri"))
            self.run_id = tracking["run_id"]

    def add(self, metrics: dict, step: int) -> None:
        self.rows.extend((k, float(v), step) for k, v in metrics.items())

    def flush(self) -> None:
        if self.client is None or not self.rows:
            self.rows = []
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, s) for k, v, s in self.rows]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self.rows = []

    def set_tag(self, key: str, value) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, str(value))


#  The worker function


@dataclass
class WorkerData:
    train_images: np.ndarray
    train_genes: np.ndarray
    val_images: np.ndarray
    val_genes: np.ndarray


def gene_inputs(gene_trunk, shards, split: str) -> np.ndarray:
    """Per-spot transformed counts (or tokens) of a split, for a trainable gene encoder. Uses the
    training split's statistics stored with the shards, so a spot's input never depends on its batch."""
    from hescape.data.gene_transforms import transform_for

    transform = transform_for(gene_trunk, shards.gene_stats())
    out = transform(np.asarray(shards.split(split).counts))
    return np.asarray(out.numpy() if isinstance(out, torch.Tensor) else out)


def load_worker_data(config: dict, gene_trunk) -> WorkerData:
    from hescape.data.shards import Shards

    shards = Shards(config["shards"])
    out = {}
    for split in ("train", "val"):
        feats = config.get("image_features")
        images = np.load(feats[split], mmap_mode="r") if feats else shards.split(split).images
        gfeats = config.get("gene_features")
        genes = np.load(gfeats[split]) if gfeats else gene_inputs(gene_trunk, shards, split)
        out[f"{split}_images"], out[f"{split}_genes"] = images, genes
    return WorkerData(**out)


def train_worker(config: dict, context: WorkerContext | None = None) -> dict:
    """Train one run. ``config``: ``train`` (TrainConfig as dict), ``shards`` (directory),
    optional ``image_features`` / ``gene_features`` (split -> cached .npy), ``spec`` (dims) and
    ``tracking`` (MLflow ``uri`` + ``run_id``, used by rank 0 only)."""
    ctx = context or RayContext()
    cfg = from_dict(TrainConfig, config["train"])
    use_gpu = cfg.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed + ctx.rank)
    np.random.seed((cfg.seed + ctx.rank) % 2**32)
    if not use_gpu:
        # Fractional CPUs per worker on small machines: one thread each avoids oversubscription.
        torch.set_num_threads(max(1, int(os.environ.get("HESCAPE_TORCH_THREADS", "1"))))

    model = build_model(cfg, config["spec"]).to(device)
    data = load_worker_data(config, model.gene_trunk)
    cached_images = config.get("image_features") is not None
    train_set = PairDataset(data.train_images, data.train_genes, seed=cfg.seed,
                            augment=AugmentConfig() if cfg.augment and not cached_images else None)
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=_collate, num_workers=0)
    if len(loader) == 0:
        raise ValueError(f"training split too small: {len(train_set)} pairs for batch {cfg.batch_size} "
                         f"x {ctx.world_size} workers")

    from hescape.losses import param_groups

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    total_steps = cfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total_steps))

    # Internally "lower is better": a score to maximise is negated.
    sign = 1.0 if cfg.monitor_mode == "min" else -1.0
    start_epoch, best_val, bad_epochs, best_epoch = 0, math.inf, 0, -1
    tracker = MetricBuffer(config.get("tracking") if ctx.rank == 0 else None)
    restored = ctx.latest_checkpoint()
    if restored is not None:
        model.load_saved_state(torch.load(restored / MODEL_FILE, map_location=device, weights_only=True))
        state = torch.load(restored / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        best_val, bad_epochs, best_epoch = float(state["best_val"]), int(state["bad_epochs"]), int(state["best_epoch"])
        log.info("rank %d resumed from the checkpoint of epoch %d", ctx.rank, start_epoch - 1)
        tracker.set_tag("resumed_from_epoch", start_epoch - 1)

    ddp_model = model
    if ctx.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if use_gpu else None,
            find_unused_parameters=False,
        )

    epoch_hook = None
    if config.get("epoch_hook") and ctx.rank == 0:
        from hescape.tune.pruning import make_epoch_hook

        epoch_hook = make_epoch_hook(config["epoch_hook"])
    elif config.get("epoch_hook"):
        epoch_hook = _follower_hook

    step = start_epoch * len(loader)
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        train_set.epoch = epoch
        model.train()
        running, n_batches = 0.0, 0
        for images, genes in loader:
            images, genes = images.to(device, non_blocking=True), genes.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_gpu):
                loss, _, _ = ddp_model(images, genes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
            n_batches += 1
            step += 1
            if step % cfg.log_every_n_steps == 0:
                tracker.add({"train_loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0],
                             "grad_norm": float(grad_norm), "logit_scale": float(model.loss.scale().detach())},
                            step)
        train_time = time.perf_counter() - t0
        img, gene = embed_split(model, data.val_images, data.val_genes, rank=ctx.rank, world_size=ctx.world_size,
                                batch_size=max(cfg.batch_size, 256), device=device)
        metrics = validation_metrics(model.loss, img, gene, global_batch=cfg.batch_size * ctx.world_size,
                                     normalize=cfg.normalize)
        metrics.update(epoch=epoch, train_loss_epoch=running / max(1, n_batches), epoch_time_s=train_time, step=step)
        if epoch_hook is not None:
            # An external judge (an Optuna pruner during tuning) may stop the run; rank 0 decides
            # and every rank follows, so all workers make the same number of report calls.
            stop_now = bool(epoch_hook(metrics, epoch)) if ctx.rank == 0 else False
            metrics["stopped_by_hook"] = float(_broadcast_flag(stop_now, ctx.world_size))
        if cfg.monitor not in metrics:
            raise KeyError(f"train.monitor {cfg.monitor!r} is not a validation metric; have {sorted(metrics)}")
        value = sign * metrics[cfg.monitor]
        if value < best_val - cfg.min_delta:
            best_val, bad_epochs, best_epoch = value, 0, epoch
        else:
            bad_epochs += 1
        stop = bad_epochs >= cfg.patience or epoch == cfg.epochs - 1
        metrics.update(best_score=sign * best_val, best_epoch=best_epoch)
        tracker.add({k: v for k, v in metrics.items() if k not in ("epoch", "step")}, epoch)
        tracker.flush()
        history.append(metrics)

        with tempfile.TemporaryDirectory() as tmp:
            ckpt_dir = None
            if ctx.rank == 0:
                torch.save(model.saved_state(), Path(tmp) / MODEL_FILE)
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                            "best_val": best_val, "bad_epochs": bad_epochs, "best_epoch": best_epoch},
                           Path(tmp) / STATE_FILE)
                info = {"epoch": epoch, "metrics": metrics,
                        **{k: config.get(k) for k in ("spec", "train", "shards", "image_features", "gene_features")}}
                (Path(tmp) / INFO_FILE).write_text(json.dumps(info))
                ckpt_dir = tmp
            ctx.report(metrics, ckpt_dir)
        if metrics.get("stopped_by_hook"):
            log.info("stopped by the epoch hook at epoch %d", epoch)
            break
        if epoch < cfg.epochs - 1 and bad_epochs >= cfg.patience:
            log.info("early stopping at epoch %d (best %d)", epoch, best_epoch)
            break
        if stop:
            break
    return {"history": history, "best_epoch": best_epoch, "best_score": sign * best_val, "monitor": cfg.monitor}


def _follower_hook(metrics: dict, epoch: int) -> bool:
    return False  # non-zero ranks take rank 0's decision through _broadcast_flag


def _broadcast_flag(flag: bool, world_size: int) -> bool:
    if world_size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return bool(t.item())


def run_local(config: dict, storage: str | Path) -> tuple[dict, LocalContext]:
    """Run :func:`train_worker` in this process (world size 1), checkpoints under ``storage``."""
    cfg = from_dict(TrainConfig, config["train"])
    ctx = LocalContext(storage, score=cfg.monitor, mode=cfg.monitor_mode)
    return train_worker(config, ctx), ctx
