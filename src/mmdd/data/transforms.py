"""Batched, device-side image transforms (normalisation and train augmentation).

Images travel as uint8 [B,3,H,W] and become normalised floats on the device, so augmentation
costs one grid_sample per batch instead of a PIL pipeline per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (or [0,1] float) images -> (x - mean) / std."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    m = torch.as_tensor(list(mean), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(list(std), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised floats -> [0,1] floats (clamped), for saving/plotting."""
    m = torch.as_tensor(list(mean), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(list(std), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


@dataclass
class AugmentConfig:
    enabled: bool = True
    scale: tuple[float, float] = (0.7, 1.0)  # area fraction of the random crop
    ratio: tuple[float, float] = (0.85, 1.18)  # aspect ratio range of the crop
    hflip: bool = False  # off for synscenes: captions say "left of"


def random_resized_crop(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random resized crop (+ optional horizontal flip) of a float batch."""
    if not cfg.enabled:
        return x
    b = x.shape[0]
    dev = x.device

    def uniform(lo, hi):
        return torch.rand(b, generator=generator).to(dev) * (hi - lo) + lo

    area = uniform(*cfg.scale)
    log_ratio = uniform(torch.log(torch.tensor(cfg.ratio[0])).item(), torch.log(torch.tensor(cfg.ratio[1])).item())
    ratio = log_ratio.exp()
    sx = (area * ratio).sqrt().clamp(max=1.0)  # crop width as a fraction of the image
    sy = (area / ratio).sqrt().clamp(max=1.0)
    tx = (torch.rand(b, generator=generator).to(dev) * 2 - 1) * (1 - sx)
    ty = (torch.rand(b, generator=generator).to(dev) * 2 - 1) * (1 - sy)
    if cfg.hflip:
        flip = torch.where(torch.rand(b, generator=generator).to(dev) < 0.5, -1.0, 1.0)
    else:
        flip = torch.ones(b, device=dev)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = sx * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment_config(cfg) -> AugmentConfig:
    if cfg is None:
        return AugmentConfig(enabled=False)
    return AugmentConfig(
        enabled=bool(cfg.enabled),
        scale=tuple(float(v) for v in cfg.scale),
        ratio=tuple(float(v) for v in cfg.ratio),
        hflip=bool(cfg.hflip),
    )
