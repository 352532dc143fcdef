"""Image decoding: any mode to RGB, clear errors for missing or broken files.

Mode conversion (`to_rgb`):
- 16-bit grayscale (I;16*) is scaled 0..65535 -> 0..255 (not clipped at 255);
- 32-bit integer (I) is treated as 8-bit when its values fit 0..255, as 16-bit when they fit
  0..65535 (how older Pillow opens 16-bit PNGs), else scaled by its maximum;
- float (F) is treated as 0..1 when its values fit that range, else scaled by its maximum;
- images with alpha (RGBA, LA, PA, palette with transparency) are composited on WHITE, so
  transparent pixels do not show whatever colour values happen to be stored under alpha=0;
- everything else (L, 1, P, CMYK, YCbCr) goes through Pillow's own conversion.
EXIF orientation is not applied (as in BLIP/ALBEF's loaders).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmdd.errors import DataError

_BICUBIC = Image.Resampling.BICUBIC


def _to_8bit_gray(arr: np.ndarray, hi: float) -> Image.Image:
    arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr8, mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        return _to_8bit_gray(np.asarray(img, dtype=np.float64), 65535.0).convert("RGB")
    if mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo >= 0 and hi <= 255:
            scale = 255.0
        elif lo >= 0 and hi <= 65535:
            scale = 65535.0
        else:
            scale = max(hi, 1.0)
        return _to_8bit_gray(arr, scale).convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        hi = float(arr.max()) if arr.size else 0.0
        return _to_8bit_gray(arr, 1.0 if hi <= 1.0 else hi).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode `path` into an RGB PIL image; DataError naming the file when missing or undecodable."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"image file {path} does not exist; check data.image_root")
    if not path.is_file():
        raise DataError(f"image file {path} is not a file; check data.image_root and the annotation file")
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, zlib.error, ...)
        raise DataError(
            f"image file {path} could not be decoded ({type(exc).__name__}: {exc}); "
            f"it may be truncated or corrupt: re-download or remove it"
        ) from exc
    try:
        return to_rgb(img)
    except ValueError as exc:
        raise DataError(f"image file {path} has colour mode {img.mode!r}, which cannot be converted to RGB ({exc})") from exc


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic), then centre-crop to size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), _BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


RESIZES = ("center_crop", "squash")


def resize_image(img: Image.Image, size: int, mode: str = "center_crop") -> Image.Image:
    """`size` x `size`: center_crop (shorter side to size, then the centre) or squash (both sides to size, the
    aspect ratio not kept: torchvision's Resize((size, size)), bicubic, which the reference evaluations use, so
    nothing captioned is cut off)."""
    if mode == "squash":
        return img if img.size == (size, size) else img.resize((size, size), _BICUBIC)
    if mode != "center_crop":
        raise DataError(f"data.resize must be one of {RESIZES}, got {mode!r}")
    return resize_center_crop(img, size)


def _load_array(path, size: int, mode: str = "center_crop") -> np.ndarray:
    return np.asarray(resize_image(load_image(path), size, mode), dtype=np.uint8)


def load_images_tensor(paths, size: int, num_workers: int | None = None, resize: str = "center_crop") -> torch.Tensor:
    """uint8 [N,3,size,size]: decode, resize (`resize_image`; bicubic).

    Decoding runs in `num_workers` threads (Pillow releases the GIL while decoding/resizing);
    default: min(8, CPU count). The first failing file raises its DataError.
    """
    paths = list(paths)
    size = int(size)
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if num_workers <= 1 or len(paths) < 64:
        arrays = map(lambda p: _load_array(p, size, resize), paths)
        for i, arr in enumerate(arrays):
            out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        return out
    with ThreadPoolExecutor(num_workers) as pool:
        for i, arr in enumerate(pool.map(lambda p: _load_array(p, size, resize), paths)):
            out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return out
