"""Image transforms: normalisation, and the teachers' train augmentation in its two styles.

`data.augment.style`:
- `mmdd`: images travel as uint8 [B,3,H,W] and become normalised floats on the device, where one grid_sample per
  batch crops and flips them (fast; for small square images such as the embedded dataset);
- `blip`: the reference teachers' pipeline, image by image in the DataLoader workers (`mmdd.data.sample_augment`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmdd.data.randaugment import RandAugment
from mmdd.data.sample_augment import PerImageAugment
from mmdd.errors import DataError


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


AUGMENT_STYLES = ("mmdd", "blip")
CROP_SOURCES = ("decoded", "original")


@dataclass
class AugmentConfig:
    enabled: bool = True
    scale: tuple[float, float] = (0.7, 1.0)  # area fraction of the random crop
    ratio: tuple[float, float] = (0.85, 1.18)  # aspect ratio range of the crop
    hflip: bool = False  # off for synscenes: captions say "left of"
    style: str = "mmdd"  # see the module docstring
    crop_from: str = "decoded"  # blip style: crop the decoded pixels or the original file (mmdd.data.sample_augment)
    randaugment: RandAugment = field(default_factory=lambda: RandAugment(num_ops=0))  # blip style only


def random_resized_crop(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random resized crop (+ optional horizontal flip) of a float batch."""
    if not cfg.enabled or cfg.style != "mmdd":
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


def augment_config(augment) -> AugmentConfig:
    """`data.augment` (None: no augmentation) as an AugmentConfig; DataError naming the field when a value is wrong."""
    if augment is None:
        return AugmentConfig(enabled=False)
    style = str(augment.style)
    if style not in AUGMENT_STYLES:
        raise DataError(f"data.augment.style must be one of {AUGMENT_STYLES}, got {style!r}")
    crop_from = str(augment.crop_from)
    if crop_from not in CROP_SOURCES:
        raise DataError(f"data.augment.crop_from must be one of {CROP_SOURCES}, got {crop_from!r}")
    ra = augment.randaugment
    randaugment = RandAugment(num_ops=0)
    if ra is not None:
        randaugment = RandAugment(num_ops=int(ra.num_ops), magnitude=float(ra.magnitude),
                                  ops=tuple(str(o) for o in ra.ops))
    if style == "mmdd" and randaugment.num_ops > 0:
        raise DataError("data.augment.randaugment runs only with data.augment.style=blip (per image); set "
                        "data.augment.randaugment.num_ops=0 or data.augment.style=blip")
    return AugmentConfig(
        enabled=bool(augment.enabled),
        scale=tuple(float(v) for v in augment.scale),
        ratio=tuple(float(v) for v in augment.ratio),
        hflip=bool(augment.hflip),
        style=style,
        crop_from=crop_from,
        randaugment=randaugment,
    )


def per_image_augment(aug: AugmentConfig, data) -> PerImageAugment | None:
    """The per-image transform for the training split `data` (a SplitData) under `aug`; None unless style blip."""
    if not aug.enabled or aug.style != "blip":
        return None
    if aug.crop_from == "decoded" and data.images is None:
        raise DataError("data.augment.crop_from=decoded crops the decoded images, but this split is decoded on access "
                        "(data.decode_cache=false, data.preload=false): set data.decode_cache=true, or "
                        "data.augment.crop_from=original to crop each file as it is read")
    return PerImageAugment(size=data.image_size, scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip,
                           randaugment=aug.randaugment, crop_from=aug.crop_from, resize=data.resize)
