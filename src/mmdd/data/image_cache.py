"""Decode every image of a split once, into an on-disk uint8 array that every later stage and run memory-maps.

Flickr30K/COCO keep their images as JPEGs of about 500 x 375; decoding one and resizing it to 224 px costs
18-28 ms on one thread, and a caption-unit teacher epoch would decode each image five times. The cache decodes each
file once per (side, resize rule) - Flickr30K at 224 px is 4.4 GiB, COCO 17 GiB - and records each file's
original width and height, so random crops can still be drawn in the original image's geometry
(`mmdd.data.sample_augment`).

A cache is keyed by the files (path, byte size, modification time), the side and the resize rule: editing or
replacing an image, or changing `data.image_size`/`data.resize`, builds a new one. Building checks every image, in
threads, with a progress bar, and reports every file that fails in one message with its annotation entry. It is
written into a temporary folder beside its final place and renamed, so a killed build leaves no half cache (its
leftovers are removed by the next build).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmdd.data.images import decode_all, load_image, resize_image
from mmdd.errors import DataError
from mmdd.utils.io import atomic_write, building, stable_hash

log = logging.getLogger(__name__)

# Bump when decoding or resizing changes what a cached pixel holds (mmdd.data.images), so old caches are rebuilt.
DECODE_VERSION = 1
PIXELS, SIZES = "pixels.npy", "original_sizes.npy"
STALE_BUILD_SECONDS = 24 * 3600  # a temporary build folder older than this belongs to a dead process


@dataclass
class DecodedImages:
    """A split's images decoded once: `pixels` uint8 [N, 3, S, S] (memory-mapped, copy-on-write) and
    `original_sizes` int64 [N, 2], the (width, height) of each file as decoded."""

    pixels: np.ndarray
    original_sizes: np.ndarray
    folder: Path


def cache_key(paths, size: int, resize: str) -> str:
    """Identity of a cache: the decode rules, the side, the resize rule and every file's path, size and mtime."""
    files = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise DataError(f"image file {p} cannot be read ({exc.strerror}); check data.image_root") from exc
        files.append((str(p), st.st_size, st.st_mtime_ns))
    return stable_hash({"decode_version": DECODE_VERSION, "size": int(size), "resize": str(resize), "files": files})


def _open(folder: Path) -> DecodedImages:
    pixels = np.load(folder / PIXELS, mmap_mode="c")  # copy-on-write: writable views, the file never changes
    sizes = np.load(folder / SIZES)
    return DecodedImages(pixels=pixels, original_sizes=sizes, folder=folder)


def _remove_stale_builds(root: Path) -> None:
    now = time.time()
    for tmp in root.glob(".build-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def verify_images(paths, cache_root: str | Path, sources=None, name: str = "images",
                  num_workers: int | None = None) -> None:
    """Decode every file once, for splits read from the files on each access (data.decode_cache=false): a broken
    image is reported when the split is opened, with every other broken one, not by a DataLoader worker hours in.
    Remembered by the files' paths, sizes and mtimes, so the next run with the same files skips it."""
    paths = [Path(p) for p in paths]
    root = Path(cache_root)
    marker = root / f"verified-{cache_key(paths, 0, 'verify')[:16]}"
    if marker.exists():
        return
    with building(root / f".{marker.name}.lock", f"the check of {name}'s images"):
        if marker.exists():
            return  # another process checked them while this one waited
        decode_all(lambda i: load_image(paths[i]), paths, sources, name, num_workers)
        atomic_write(marker, lambda p: p.write_text(f"{len(paths)} images of {name} decode\n"))


def decoded_images(paths, size: int, resize: str, cache_root: str | Path, sources=None, name: str = "images",
                   num_workers: int | None = None) -> DecodedImages:
    """The cached decode of `paths` at `size` x `size` (`resize` rule), built first if missing.

    `sources[i]` names the annotation entry of image i, for the error message; `name` labels the progress bar.
    Raises one DataError listing every image that cannot be decoded.
    """
    paths = [Path(p) for p in paths]
    size = int(size)
    root = Path(cache_root)
    folder = root / f"{size}px-{resize}-{cache_key(paths, size, resize)[:16]}"
    if (folder / PIXELS).is_file():
        return _open(folder)
    with building(root / f".{folder.name}.lock", f"the decode cache of {name}"):
        if not (folder / PIXELS).is_file():  # else another process built it while this one waited
            _build(folder, paths, size, resize, sources, name, num_workers)
    return _open(folder)


def _build(folder: Path, paths: list[Path], size: int, resize: str, sources, name: str,
           num_workers: int | None) -> None:
    root = folder.parent
    _remove_stale_builds(root)
    n = len(paths)
    need = n * 3 * size * size
    free = shutil.disk_usage(root).free
    if need > free:
        raise DataError(f"decoding the {n} images of {name} at {size} px needs {need / 2**30:.1f} GiB in {root}, "
                        f"which has {free / 2**30:.1f} GiB free; free space there or point paths.cache_dir elsewhere")
    tmp = root / f".build-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        pixels = np.lib.format.open_memmap(tmp / PIXELS, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
        sizes = np.zeros((n, 2), dtype=np.int64)

        def decode(i: int) -> None:
            img = load_image(paths[i])
            sizes[i] = img.size
            pixels[i] = np.asarray(resize_image(img, size, resize), dtype=np.uint8).transpose(2, 0, 1)

        log.info("decoding the %d images of %s once into %s (%.2f GiB)", n, name, folder, need / 2**30)
        decode_all(decode, paths, sources, name, num_workers)
        pixels.flush()
        del pixels
        np.save(tmp / SIZES, sizes)
        for f in (PIXELS, SIZES):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / PIXELS).is_file():  # not another process finishing the same cache first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
