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
from tqdm import tqdm

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


MAX_LISTED_ERRORS = 20


def decode_all(decode, paths, sources=None, name: str = "images", num_workers: int | None = None) -> None:
    """Run `decode(i)` for every image in threads with a progress bar; then raise one DataError listing every image
    whose decode raised a DataError, with its annotation entry (`sources[i]`)."""
    if len(paths) == 1:
        decode(0)  # one image read on access: its own error as is
        return
    errors: list[tuple[int, str]] = []

    def run(i: int) -> None:
        try:
            decode(i)
        except DataError as exc:
            errors.append((i, str(exc)))

    workers = max(1, num_workers or min(8, os.cpu_count() or 1))
    if len(paths) < 64:  # a batch read on access: no threads, no progress bar
        for i in range(len(paths)):
            run(i)
    else:
        # Pillow releases the GIL while decoding and resizing, so threads scale with cores.
        with ThreadPoolExecutor(workers) as pool, tqdm(total=len(paths), desc=f"decode {name}", unit="img",
                                                       disable=None, leave=False) as bar:
            for _ in pool.map(run, range(len(paths))):
                bar.update()
    if errors:
        errors.sort()
        lines = [f"  {sources[i] if sources else paths[i]}: {msg}" for i, msg in errors[:MAX_LISTED_ERRORS]]
        more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
        raise DataError(f"{len(errors)} of the {len(paths)} images of {name} cannot be used:\n" + "\n".join(lines)
                        + more + "\nre-download or replace these files (or remove their annotation entries), then rerun")


def load_images_tensor(paths, size: int, num_workers: int | None = None, resize: str = "center_crop", sources=None,
                       name: str = "images") -> torch.Tensor:
    """uint8 [N,3,size,size]: decode, resize (`resize_image`; bicubic).

    Decoding runs in `num_workers` threads (Pillow releases the GIL while decoding/resizing);
    default: min(8, CPU count). Every failing file is reported in one DataError (`decode_all`).
    """
    paths = list(paths)
    size = int(size)
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)

    def decode(i: int) -> None:
        arr = np.asarray(resize_image(load_image(paths[i]), size, resize), dtype=np.uint8)
        out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)

    decode_all(decode, paths, sources, name, num_workers)
    return out
