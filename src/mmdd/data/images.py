"""Image decoding: any mode to RGB, clear errors for missing or broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmdd.errors import DataError


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit: rescale the value range to 8 bit instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: transparent regions would otherwise show arbitrary colour values.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise DataError(f"image file {path} does not exist; check data.image_root")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"image file {path} could not be decoded ({exc}); it may be truncated or corrupt") from exc


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_images_tensor(paths, size: int) -> torch.Tensor:
    """uint8 [N,3,size,size]: decode, resize the shorter side, centre-crop."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        arr = np.asarray(resize_center_crop(load_image(p), size), dtype=np.uint8)
        out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return out
