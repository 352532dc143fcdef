"""Differentiable Siamese augmentation (DSA; Zhao & Bilen, ICML 2021), as DM (WACV 2023) uses it.

Every iteration draws one transformation and applies it, identically, to the real and to the synthetic batch, and to
every image of each (DSA's "Siamese" mode: DatasetCondensation's utils.py fixes each parameter to its first draw
under a shared seed); gradients flow through it to the synthetic pixels. The standard strategy names six families,
`color_crop_cutout_flip_scale_rotate`; mode `single` (DSA's default 'S') applies one family drawn uniformly per
iteration, `all` ('M') every family in the strategy's order. The parameters' defaults are DSA's (ParamDiffAug):
brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5], translation up to 1/8 of the side (zero padded), a
cutout square of half the side, horizontal flip with probability 0.5, scale in [1/1.2, 1.2] per axis, rotation up to
15 degrees. Images are augmented in their normalised space, as DSA does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mmdd.config_schema import check_fields
from mmdd.errors import MmddError

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(kw_only=True)
class DSASettings:
    """method.dsa (conf/method/dm.yaml): the transformation families and their ranges."""

    strategy: str  # families joined by "_", e.g. color_crop_cutout_flip_scale_rotate (DSA's DM setting)
    mode: Literal["single", "all"]  # single: one family drawn per iteration (DSA's 'S') | all: each in order ('M')
    brightness: float  # x + (u - 0.5) * brightness
    saturation: float  # (x - channel mean) * u * saturation + channel mean
    contrast: float  # (x - image mean) * (u + contrast) + image mean
    ratio_crop_pad: float  # translation up to round(side * ratio) pixels, zero padded
    ratio_cutout: float  # a zeroed square of round(side * ratio) pixels
    prob_flip: float
    ratio_scale: float  # scale per axis in [1/ratio, ratio]
    ratio_rotate: float  # degrees, in [-ratio, ratio]

    def __post_init__(self):
        check_fields(self, "method.dsa", "fix it in conf/method/ or on the command line")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise MmddError(f"method.dsa.strategy={self.strategy!r}: families joined by '_' from {FAMILIES}"
                            + (f"; unknown: {unknown}" if unknown else ""))
        if self.ratio_scale < 1 or not 0 <= self.prob_flip <= 1 or not 0 <= self.ratio_cutout <= 1:
            raise MmddError("method.dsa: ratio_scale must be >= 1, prob_flip and ratio_cutout in [0, 1]")

    @property
    def families(self) -> list[str]:
        return [f for f in self.strategy.split("_") if f]


class SiameseAugment:
    """`draw(generator)` one iteration's transformation; `apply(images, drawn)` it to a batch (differentiably)."""

    def __init__(self, settings: DSASettings):
        self.s = settings

    def draw(self, generator: torch.Generator, height: int, width: int) -> list[tuple[str, dict[str, float]]]:
        """The families to apply to images of `height` x `width`, in order, each with its parameters (one value each:
        the whole batch, real and synthetic, shares them)."""
        s = self.s
        families = s.families
        if s.mode == "single":
            families = [families[int(torch.randint(len(families), (1,), generator=generator))]]

        def u() -> float:
            return float(torch.rand((), generator=generator))

        def shift(side: int) -> int:  # an integer in [-k, k], k = round(side * ratio_crop_pad)
            k = _pixels(s.ratio_crop_pad, side)
            return int(torch.randint(-k, k + 1, (1,), generator=generator))

        drawn = []
        for family in families:
            if family == "color":
                params = {"brightness": u(), "saturation": u(), "contrast": u()}
            elif family == "crop":
                params = {"dx": shift(height), "dy": shift(width)}
            elif family == "cutout":
                params = {"cx": u(), "cy": u()}  # the square's centre, as a fraction of the side
            elif family == "flip":
                params = {"flip": float(u() < s.prob_flip)}
            elif family == "scale":
                lo = 1.0 / s.ratio_scale
                params = {"sx": lo + u() * (s.ratio_scale - lo), "sy": lo + u() * (s.ratio_scale - lo)}
            else:  # rotate
                params = {"angle": (u() - 0.5) * 2 * math.radians(s.ratio_rotate)}
            drawn.append((family, params))
        return drawn

    def apply(self, images: torch.Tensor, drawn: list[tuple[str, dict[str, float]]]) -> torch.Tensor:
        for family, p in drawn:
            images = getattr(self, f"_{family}")(images, p)
        return images.contiguous()

    def _color(self, x, p):
        s = self.s
        x = x + (p["brightness"] - 0.5) * s.brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (p["saturation"] * s.saturation) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (p["contrast"] + s.contrast) + mean

    @staticmethod
    def _crop(x, p):
        """Translate by (dx, dy) pixels (rows, columns), the uncovered border zero (a 1-pixel zero frame, clamped to)."""
        h, w = x.shape[-2:]
        framed = F.pad(x, (1, 1, 1, 1))
        rows = (torch.arange(h, device=x.device) + p["dx"] + 1).clamp(0, h + 1)
        cols = (torch.arange(w, device=x.device) + p["dy"] + 1).clamp(0, w + 1)
        return framed[:, :, rows][:, :, :, cols]

    def _cutout(self, x, p):
        h, w = x.shape[-2:]
        kh, kw = _pixels(self.s.ratio_cutout, h), _pixels(self.s.ratio_cutout, w)
        # the centre among h (odd square) or h + 1 (even) positions, as DSA's randint(0, side + 1 - k % 2)
        top = min(int(p["cx"] * (h + 1 - kh % 2)), h - kh % 2) - kh // 2
        left = min(int(p["cy"] * (w + 1 - kw % 2)), w - kw % 2) - kw // 2
        mask = torch.ones(h, w, dtype=x.dtype, device=x.device)
        mask[max(top, 0): max(top + kh, 0), max(left, 0): max(left + kw, 0)] = 0
        return x * mask

    @staticmethod
    def _flip(x, p):
        return x.flip(3) if p["flip"] else x

    @staticmethod
    def _scale(x, p):
        return _warp(x, [[p["sx"], 0.0, 0.0], [0.0, p["sy"], 0.0]])

    @staticmethod
    def _rotate(x, p):
        c, s = math.cos(p["angle"]), math.sin(p["angle"])
        return _warp(x, [[c, -s, 0.0], [s, c, 0.0]])


def _pixels(ratio: float, side: int) -> int:
    """round(side * ratio) as DSA rounds it."""
    return int(side * ratio + 0.5)


def _warp(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    """An affine warp (bilinear, zeros outside), one matrix for the whole batch."""
    matrix = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(matrix, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)
