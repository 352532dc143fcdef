"""BLIP's RandomAugment, the teachers' augmentation in MTT-VL, LoRS and RepBlend, on uint8 image tensors.

The reference (BLIP `transform/randaugment.py`, the same file as LoRS `data/randaugment.py`) draws `num_ops`
operations with replacement from a list and applies each with probability 0.5 at `magnitude` (of 10), with numpy
and OpenCV on HWC arrays. The operations here compute the same pixels on [3, H, W] tensors (tests compare each with
OpenCV and Pillow); the random draws have the same structure but come from torch's generator.

At the papers' magnitude 5 the enhance operations (Brightness, Sharpness) have factor 5/10 * 1.8 + 0.1 = 1.0, so
they leave the image unchanged, as in the reference. Shear is 0.15, translation 5 pixels (absolute, at any image
size), rotation 15 degrees, each with a random sign; geometric operations fill with grey 128.

Two deliberate differences, both outside the papers' setting:
- AutoContrast: the reference casts the channel minimum to int8 (`np.int8(low)`), which wraps for minima above 127
  and maps such a channel almost entirely to 255; here the minimum is used as is (Pillow's ImageOps.autocontrast,
  which the reference's docstring says it reproduces). Only channels with no pixel darker than 128 differ.
- Sharpness at a factor other than 0 or 1 (magnitudes other than 5): the reference casts the blend to uint8
  without clipping, so values beyond 0..255 wrap around; here they are clipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmdd.errors import DataError

MAX_LEVEL = 10
FILL = 128.0
TRANSLATE_PIXELS = 10  # translation at level MAX_LEVEL, in pixels
BLIP_OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY", "TranslateX",
            "TranslateY", "Rotate")


def _lut(img: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Apply a per-channel 256-entry lookup table [C, 256] to a uint8 image [C, H, W]."""
    c = img.shape[0]
    flat = img.reshape(c, -1).long()
    return torch.gather(tables.to(torch.uint8), 1, flat).reshape(img.shape)


def autocontrast(img: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to 0..255 (Pillow's ImageOps.autocontrast with cutoff 0: table truncated to uint8)."""
    tables = []
    for ch in img:
        lo, hi = int(ch.min()), int(ch.max())
        levels = torch.arange(256, dtype=torch.float64)
        if hi <= lo:
            tables.append(levels)
            continue
        scale = 255.0 / (hi - lo)
        tables.append((levels * scale - lo * scale).clamp(0, 255))
    return _lut(img, torch.stack(tables).floor())


def equalize(img: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel (Pillow's ImageOps.equalize)."""
    tables = []
    for ch in img:
        hist = torch.bincount(ch.reshape(-1).long(), minlength=256)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            tables.append(torch.arange(256))
            continue
        shifted = torch.cat([torch.tensor([step // 2]), hist[:-1]])
        tables.append((torch.cumsum(shifted, 0) // step).clamp(0, 255))
    return _lut(img, torch.stack(tables))


def enhance_factor(level: float) -> float:
    return level / MAX_LEVEL * 1.8 + 0.1


def brightness(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale every value by `factor` (table truncated to uint8, as the reference)."""
    table = (torch.arange(256, dtype=torch.float32) * factor).clamp(0, 255).floor()
    return _lut(img, table.expand(img.shape[0], 256))


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def sharpness(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with a smoothed copy (Pillow's ImageEnhance.Sharpness kernel); the border pixels stay as they are."""
    if factor == 1.0:
        return img
    x = img.float().unsqueeze(1)  # [C, 1, H, W]: the same kernel on every channel
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), _SMOOTH.view(1, 1, 3, 3)).round().clamp(0, 255)
    if factor == 0.0:
        return smooth.squeeze(1).to(torch.uint8)
    out = x.clone()
    inner = smooth[..., 1:-1, 1:-1]
    out[..., 1:-1, 1:-1] = (inner + factor * (x[..., 1:-1, 1:-1] - inner)).clamp(0, 255).floor()
    return out.squeeze(1).to(torch.uint8)


def warp_affine(img: torch.Tensor, matrix: list[list[float]]) -> torch.Tensor:
    """OpenCV's warpAffine(img, matrix) with bilinear sampling and a grey border: output pixel (x, y) takes the
    input at matrix^-1 (x, y), pixel centres at integer coordinates."""
    _, h, w = img.shape
    forward = torch.tensor(matrix + [[0.0, 0.0, 1.0]], dtype=torch.float64)
    inverse = torch.linalg.inv(forward)[:2].float()
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    src = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ inverse.T  # [H, W, 2] input (x, y)
    grid = torch.stack([src[..., 0] * 2 / (w - 1) - 1, src[..., 1] * 2 / (h - 1) - 1], -1).unsqueeze(0)
    # Sampling (img - fill) with zero padding = sampling img with a constant `fill` border, blended at the edge.
    out = F.grid_sample(img.float().unsqueeze(0) - FILL, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return (out.squeeze(0) + FILL).round().clamp(0, 255).to(torch.uint8)


def shear_x(img, factor):
    return warp_affine(img, [[1.0, factor, 0.0], [0.0, 1.0, 0.0]])


def shear_y(img, factor):
    return warp_affine(img, [[1.0, 0.0, 0.0], [factor, 1.0, 0.0]])


def translate_x(img, offset):
    return warp_affine(img, [[1.0, 0.0, -offset], [0.0, 1.0, 0.0]])


def translate_y(img, offset):
    return warp_affine(img, [[1.0, 0.0, 0.0], [0.0, 1.0, -offset]])


def rotate(img, degrees):
    """Counter-clockwise by `degrees` about (W/2, H/2) (OpenCV's getRotationMatrix2D, as the reference)."""
    _, h, w = img.shape
    cx, cy = w / 2, h / 2
    a, b = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return warp_affine(img, [[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


def _signed(value: float, negative: bool) -> float:
    return -value if negative else value


@dataclass
class RandAugment:
    """Draw `num_ops` of `ops` (with replacement), apply each with probability 0.5 at `magnitude` of 10."""

    num_ops: int = 2
    magnitude: float = 5
    ops: tuple[str, ...] = field(default=BLIP_OPS)

    def __post_init__(self):
        unknown = [o for o in self.ops if o not in _OPS]
        if unknown:
            raise DataError(f"data.augment.randaugment.ops: unknown operation(s) {unknown}; "
                              f"choose from {sorted(_OPS)}")
        if not self.ops and self.num_ops > 0:
            raise DataError("data.augment.randaugment.ops is empty; list operations or set num_ops: 0")

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        def rand() -> float:
            return float(torch.rand((), generator=generator))

        picks = torch.randint(len(self.ops), (self.num_ops,), generator=generator).tolist()
        for k in picks:
            if rand() > 0.5:  # each drawn operation is applied with probability 0.5
                continue
            img = _OPS[self.ops[k]](img, self.magnitude, rand)
        return img


# name -> fn(img, magnitude, rand): the reference's level-to-argument rules (the sign draws included).
_OPS = {
    "Identity": lambda img, m, rand: img,
    "AutoContrast": lambda img, m, rand: autocontrast(img),
    "Equalize": lambda img, m, rand: equalize(img),
    "Brightness": lambda img, m, rand: brightness(img, enhance_factor(m)),
    "Sharpness": lambda img, m, rand: sharpness(img, enhance_factor(m)),
    "ShearX": lambda img, m, rand: shear_x(img, _signed(m / MAX_LEVEL * 0.3, rand() > 0.5)),
    "ShearY": lambda img, m, rand: shear_y(img, _signed(m / MAX_LEVEL * 0.3, rand() > 0.5)),
    "TranslateX": lambda img, m, rand: translate_x(img, _signed(m / MAX_LEVEL * TRANSLATE_PIXELS, rand() > 0.5)),
    "TranslateY": lambda img, m, rand: translate_y(img, _signed(m / MAX_LEVEL * TRANSLATE_PIXELS, rand() > 0.5)),
    "Rotate": lambda img, m, rand: rotate(img, _signed(m / MAX_LEVEL * 30, rand() < 0.5)),
}
