"""Training strategies for an encoder trunk: ``frozen``, ``lora`` and ``full``.

:func:`apply_strategy` wraps the encoder in a :class:`StrategyModule`, which forwards calls and
attributes (``feature_dim``, ``forward_tokens``, ...) to it and records what is trainable:

- ``frozen``: no parameter requires grad and the encoder stays in eval mode even when a parent
  module calls ``.train()`` (the reference code left frozen trunks in train mode, so dropout was
  active and BatchNorm statistics drifted: defect 5 of PROTOCOL.md section 5). ``is_frozen`` is
  True, which lets the feature cache compute the trunk's features once.
- ``lora``: PEFT LoRA adapters (r 8, alpha 16, dropout 0.1) on the attention ``qkv`` / ``proj``
  Linear layers; only the adapters train. A trunk without such layers is a configuration error.
- ``full``: every parameter trains.
"""

from __future__ import annotations

import logging

from torch import nn

from hescape.errors import ConfigError
from hescape.registry import Registry

log = logging.getLogger(__name__)

STRATEGIES: Registry = Registry("strategy")

LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16, 0.1
LORA_TARGETS = ("qkv", "proj")


def lora_target_names(module: nn.Module, targets=LORA_TARGETS) -> list[str]:
    """Full names of the ``nn.Linear`` layers whose last name component is in ``targets``.

    Only Linear layers: a ViT's patch-embedding convolution and CTransPath's conv stem are also
    called ``proj``, and LoRA on attention does not mean them.
    """
    return [name for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())


class StrategyModule(nn.Module):
    """An encoder with a training strategy applied.

    Calls go to the wrapped encoder (``self.module``); attributes it has and this wrapper lacks
    (``feature_dim``, ``forward_tokens``, ``input_size``, ...) are looked up on it.

    Attributes
    ----------
    strategy
        ``"frozen"``, ``"lora"`` or ``"full"``.
    num_trainable, num_parameters
        Parameter counts after the strategy was applied.
    """

    def __init__(self, module: nn.Module, strategy: str):
        super().__init__()
        self.module = module
        self.strategy = strategy
        self.num_trainable, self.num_parameters = count_parameters(module)
        if self.is_frozen:
            self.module.eval()

    @property
    def is_frozen(self) -> bool:
        """True when nothing in the encoder trains (its outputs can be cached)."""
        return self.strategy == "frozen"

    def train(self, mode: bool = True):
        super().train(mode)
        if self.is_frozen:
            # A frozen trunk is a fixed function: dropout off and BatchNorm statistics fixed, whatever
            # mode the parent model is switched to.
            self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Read __dict__ directly: during unpickling/deepcopy _modules does not exist yet, and going
            # through getattr again would recurse forever.
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:
                raise
            return getattr(inner, name)

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, trainable={self.num_trainable:,}/{self.num_parameters:,}"


def _trunk_of(encoder: nn.Module) -> nn.Module:
    """The part LoRA adapts: ``encoder.trunk`` when the encoder has one, else the encoder itself."""
    trunk = getattr(encoder, "trunk", None)
    return trunk if isinstance(trunk, nn.Module) else encoder


@STRATEGIES.register("frozen")
def frozen(encoder: nn.Module) -> StrategyModule:
    """No gradients, always eval mode."""
    encoder.requires_grad_(False)
    return StrategyModule(encoder, "frozen")


@STRATEGIES.register("full")
def full(encoder: nn.Module) -> StrategyModule:
    """Every parameter trains."""
    encoder.requires_grad_(True)
    return StrategyModule(encoder, "full")


@STRATEGIES.register("lora")
def lora(encoder: nn.Module, *, r: int = LORA_R, alpha: int = LORA_ALPHA, dropout: float = LORA_DROPOUT,
         targets: tuple[str, ...] | list[str] = LORA_TARGETS) -> StrategyModule:
    """LoRA adapters on the trunk's ``qkv`` / ``proj`` Linear layers; only the adapters train.

    Raises
    ------
    ConfigError
        The trunk has no Linear layer named like ``targets`` (e.g. a CNN such as resnet18).
    """
    from peft import LoraConfig, inject_adapter_in_model

    trunk = _trunk_of(encoder)
    names = lora_target_names(trunk, tuple(targets))
    if not names:
        what = getattr(encoder, "name", None) or type(trunk).__name__
        raise ConfigError(f"strategy 'lora' needs Linear layers named {list(targets)} (attention projections), but "
                          f"trunk {what!r} ({type(trunk).__name__}) has none; use strategy 'frozen' or 'full'")
    encoder.requires_grad_(False)
    # Exact module names (not the bare suffixes) so PEFT cannot also match same-named convolutions.
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    inject_adapter_in_model(config, trunk)
    for pname, param in encoder.named_parameters():
        param.requires_grad = "lora_" in pname
    return StrategyModule(encoder, "lora")


def apply_strategy(encoder: nn.Module, name: str, **kw) -> StrategyModule:
    """Apply strategy ``name`` to ``encoder`` (modified in place) and return the wrapped module.

    The number of trainable parameters is logged and kept on the result (``num_trainable``).
    """
    factory = STRATEGIES.get(name)
    try:
        module = factory(encoder, **kw)
    except TypeError as exc:  # an option this strategy does not take
        raise ConfigError(f"strategy {name!r}: {exc}") from exc
    what = getattr(encoder, "name", type(encoder).__name__)
    log.info("strategy %s on %s: %s of %s parameters trainable", name, what, f"{module.num_trainable:,}",
             f"{module.num_parameters:,}")
    return module


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` is frozen (a ``frozen`` :class:`StrategyModule`, or nothing requires grad)."""
    flag = getattr(module, "is_frozen", None)
    if isinstance(flag, bool):
        return flag
    return not any(p.requires_grad for p in module.parameters())
