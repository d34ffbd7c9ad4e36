"""The ``train`` block of params.yaml as a typed config."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    """Everything that defines one alignment run (one encoder pair x loss x strategy x seed).

    The defaults follow PROTOCOL.md where it applies to this machine; params.yaml sets the values
    actually used, and ``--set train.key=value`` overrides them for one run.
    """

    # Model
    image_encoder: str = "efficientnet_lite0"
    gene_encoder: str = "mlp"
    loss: str = "clip"
    strategy: str = "frozen"  # image trunk: frozen | lora | full
    image_head: str = "linear"
    gene_head: str = "linear"
    head_hidden: int = 256
    head_dropout: float = 0.2
    embed_dim: int = 128
    temperature: float = 0.07
    normalize: bool = True  # False = the reference code's unnormalised embeddings
    pretrained: bool = True
    weights_dir: str | None = None
    image_encoder_kwargs: dict = field(default_factory=dict)
    gene_encoder_kwargs: dict = field(default_factory=dict)

    # Optimisation
    epochs: int = 10
    batch_size: int = 64  # per worker; the loss sees batch_size x workers pairs
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 5.0
    patience: int = 5  # validations without improvement before stopping
    min_delta: float = 0.01  # smallest change of the monitored metric that counts as improvement
    # Early stopping and the "best" checkpoint follow this validation metric: a *loss (lower is
    # better) or a retrieval score such as val_R_at_5 (higher is better).
    monitor: str = "val_loss"
    seed: int = 42
    augment: bool = True  # per-sample train augmentation (not applied when trunk features are cached)
    feature_cache: bool = True  # frozen trunks: compute features once, train the heads only
    cache_dir: str = "data/cache"

    # Scaling (Ray Train)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional, so other tasks still schedule on small machines
    max_failures: int = 2
    storage_path: str = "runs/ray"

    # Tracking
    experiment: str | None = None  # default: one experiment per panel
    log_every_n_steps: int = 10

    @property
    def monitor_mode(self) -> str:
        """``"min"`` for losses, ``"max"`` for scores."""
        return "min" if self.monitor.endswith("loss") else "max"

    @property
    def run_name(self) -> str:
        return f"{self.gene_encoder}-{self.image_encoder}-{self.loss}-{self.strategy}-s{self.seed}"
