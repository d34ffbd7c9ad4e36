"""Image transforms: physical-size cropping at preprocessing time, and the per-sample train
augmentation / deterministic evaluation transform applied to pre-decoded uint8 patches.

The reference code cropped fixed pixel sizes (so the field of view changed from slide to slide),
drew one random crop for a whole batch, kept blur always on and cropped at random at test time.
Here: crops are in micrometres, evaluation is deterministic, and every augmentation parameter is
drawn per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def crop_and_resize(patch: np.ndarray, *, pixel_size_um: float | None, crop_um: float | None,
                    out_px: int, resample=Image.BICUBIC) -> np.ndarray:
    """Centre-crop ``patch`` (H, W, 3 uint8) to ``crop_um`` micrometres, then resize to ``out_px``.

    Without a pixel size (or crop) the whole patch is used, so every slide keeps the same field of
    view only when its patches were cut at a fixed physical size (curated panels record this).
    """
    h, w = patch.shape[:2]
    if crop_um is not None and pixel_size_um:
        side = round(crop_um / pixel_size_um)
        if side > min(h, w):
            raise ValueError(f"crop of {crop_um} um = {side} px exceeds the {w}x{h} px patch")
        top, left = (h - side) // 2, (w - side) // 2
        patch = patch[top:top + side, left:left + side]
    if patch.shape[0] == out_px and patch.shape[1] == out_px:
        return np.ascontiguousarray(patch)
    return np.asarray(Image.fromarray(patch).resize((out_px, out_px), resample=resample))


@dataclass(frozen=True)
class ImageNorm:
    """What an encoder expects: input side in px and per-channel mean/std on [0, 1] images."""

    input_size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


def to_model_input(batch_uint8: torch.Tensor, norm: ImageNorm) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, S, S) float normalised for the encoder (deterministic)."""
    x = batch_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != norm.input_size or x.shape[-2] != norm.input_size:
        x = F.interpolate(x, size=(norm.input_size, norm.input_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp_(0, 1)
    mean = torch.tensor(norm.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class AugmentConfig:
    """Per-sample train augmentation (PROTOCOL: flips, Gaussian blur, sharpness)."""

    flip: bool = True
    rotate90: bool = True
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    sharpness_p: float = 0.3
    sharpness_factor: tuple[float, float] = (0.5, 2.0)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, round(3 * sigma))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(xs**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one (3, H, W) float image, reflect padding."""
    k = _gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    x = img.unsqueeze(0)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return x.squeeze(0)


def _sharpness(img: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL-style sharpness: blend with a 3x3 smoothed copy (factor 1 = identity)."""
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    smooth = F.conv2d(F.pad(img.unsqueeze(0), (1, 1, 1, 1), mode="replicate"),
                      kernel.view(1, 1, 3, 3).expand(3, 1, 3, 3), groups=3).squeeze(0)
    return (smooth + factor * (img - smooth)).clamp_(0, 1)


def augment_patch(patch: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Augment one (H, W, 3) uint8 patch with parameters drawn for this sample alone.

    Returns a (H, W, 3) uint8 tensor, so augmented and plain batches share one input path.
    """
    img = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1).float().div_(255.0)
    if cfg.flip and rng.random() < 0.5:
        img = img.flip(-1)
    if cfg.flip and rng.random() < 0.5:
        img = img.flip(-2)
    if cfg.rotate90:
        img = torch.rot90(img, int(rng.integers(4)), dims=(-2, -1))
    if rng.random() < cfg.blur_p:
        img = _blur(img, float(rng.uniform(*cfg.blur_sigma)))
    if rng.random() < cfg.sharpness_p:
        img = _sharpness(img, float(rng.uniform(*cfg.sharpness_factor)))
    return img.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
