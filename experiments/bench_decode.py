"""Decode once against decode on every access, on a generated fixture of real-size JPEGs.

Writes `--images` photo-like JPEGs of Flickr30K's and COCO's typical sizes (500 x 375, 375 x 500, 500 x 333,
640 x 480; quality 90) and measures,
on one thread (what one DataLoader worker does) unless noted:
- per access: decode + Resize((224, 224)) of one file (data.decode_cache=false, data.preload=false);
- the cache's one-time build (mmdd.data.image_cache, all threads) and a read of one image from it;
- the teachers' per-image transform (data.augment.style=blip): crop_from=original (decode the file, crop, flip,
  RandAugment) against crop_from=decoded (crop the cached pixels, flip, RandAugment);
- how far apart the two crop sources are: the same seeds, crop + flip only, mean absolute difference and PSNR.
Per-epoch figures are extrapolated to Flickr30K's train split (29,000 images x 5 captions, caption examples).

    python experiments/bench_decode.py --images 2000 --out outputs/bench_decode.md
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmdd.data.annotations import Split
from mmdd.data.splits import SplitData
from mmdd.data.image_cache import decoded_images
from mmdd.data.images import load_images_tensor
from mmdd.data.randaugment import BLIP_OPS, RandAugment
from mmdd.data.sample_augment import PerImageAugment
from mmdd.utils.io import atomic_write

FLICKR_EXAMPLES = 29_000 * 5


def photo_like(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour fields, hard-edged shapes, fine gratings (texture) and sensor-like noise: at quality 90 these
    JPEGs are about the byte size of Flickr30K's (130-170 kB), which is what decoding time follows."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.3)]
        img[..., c] = 128 + 70 * np.sin(xx / w * fx * math.pi + phase) * np.cos(yy / h * fy * math.pi)
    for _ in range(6):  # texture: gratings of 3-12 px periods in random directions
        period, angle = rng.uniform(3, 12), rng.uniform(0, math.pi)
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        img += rng.uniform(4, 12) * wave[..., None]
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = rng.integers(10, 80)
        mask = (xx - x0) ** 2 + (yy - y0) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


SIZES = [(500, 375), (375, 500), (500, 333), (640, 480)]  # Flickr30K's common shapes, and COCO's


def write_fixture(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        p = folder / f"{i:06d}.jpg"
        Image.fromarray(photo_like(w, h, rng)).save(p, quality=90)
        paths.append(p)
    return paths


def per_item_seconds(fn, items) -> float:
    start = time.perf_counter()
    for i in items:
        fn(i)
    return (time.perf_counter() - start) / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--timed", type=int, default=300, help="images timed per single-thread measurement")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        paths = write_fixture(tmp / "images", args.images)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e3
        print(f"fixture: {len(paths)} JPEGs, {mb:.0f} kB each on average ({time.perf_counter() - t0:.0f} s)")
        timed = list(range(0, len(paths), max(1, len(paths) // args.timed)))[: args.timed]

        per_access = per_item_seconds(lambda i: load_images_tensor([paths[i]], args.size, resize="squash"), timed)
        t0 = time.perf_counter()
        dec = decoded_images(paths, args.size, "squash", tmp / "cache", name="fixture")
        build = time.perf_counter() - t0
        pixels, sizes = torch.from_numpy(dec.pixels), dec.original_sizes
        from_cache = per_item_seconds(lambda i: pixels[i].clone(), timed)
        split = SplitData(Split("fixture", image_paths=paths), text_emb=torch.zeros(0, 1), image_size=args.size,
                          images=pixels, resize="squash", original_sizes=torch.from_numpy(sizes))
        ra = RandAugment(2, 5, BLIP_OPS)
        aug = {src: PerImageAugment(args.size, (0.5, 1.0), (0.75, 4 / 3), True, ra, crop_from=src, resize="squash")
               for src in ("original", "decoded")}
        torch.manual_seed(0)
        teacher = {src: per_item_seconds(lambda i, a=a: a(split, i), timed) for src, a in aug.items()}

        diffs, psnrs = [], []
        plain = {src: PerImageAugment(args.size, (0.5, 1.0), (0.75, 4 / 3), True, RandAugment(num_ops=0),
                                      crop_from=src, resize="squash") for src in ("original", "decoded")}
        for i in timed:
            a = plain["original"](split, i, torch.Generator().manual_seed(i)).float()
            b = plain["decoded"](split, i, torch.Generator().manual_seed(i)).float()
            mse = float(((a - b) ** 2).mean())
            diffs.append(float((a - b).abs().mean()))
            psnrs.append(10 * math.log10(255**2 / max(mse, 1e-12)))

    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
    epoch = lambda s: f"{s * FLICKR_EXAMPLES / 60:.0f} CPU-min"  # noqa: E731
    rows = [
        ("decode + Resize((224, 224)) per access (today's preload=false)", ms(per_access), epoch(per_access)),
        ("read one image from the decode cache", ms(from_cache), epoch(from_cache)),
        ("teacher transform, crop_from=original (decode, crop, flip, RandAugment)", ms(teacher["original"]),
         epoch(teacher["original"])),
        ("teacher transform, crop_from=decoded (cached pixels, crop, flip, RandAugment)", ms(teacher["decoded"]),
         epoch(teacher["decoded"])),
    ]
    lines = [
        f"{len(paths)} generated JPEGs (500 x 375, 375 x 500, 500 x 333, 640 x 480; {mb:.0f} kB average), {args.size} px, one thread, "
        f"{len(timed)} images timed per row; CPU: {os.cpu_count()} cores.",
        "",
        "| per example | time | Flickr30K train epoch (145,000 caption examples) |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"Building the cache once: {build:.1f} s for {len(paths)} images ({len(paths) / build:.0f} images/s, "
        f"{min(8, os.cpu_count() or 1)} threads); Flickr30K's 31,783 images: about "
        f"{31_783 / (len(paths) / build) / 60:.0f} min.",
        f"crop_from=original vs decoded (same boxes and flips, no RandAugment): mean |difference| "
        f"{np.mean(diffs):.2f} grey levels (max over images {np.max(diffs):.2f}), PSNR {np.mean(psnrs):.1f} dB "
        f"(min {np.min(psnrs):.1f}).",
        f"Ratios: teacher transform original / decoded = {teacher['original'] / teacher['decoded']:.1f}x; "
        f"per-access decode / cache read = {per_access / from_cache:.0f}x.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write(args.out, lambda p: p.write_text(text + "\n"))


if __name__ == "__main__":
    main()
