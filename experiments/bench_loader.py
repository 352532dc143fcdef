"""The teachers' loader rate at 224 px: how many images per second the DataLoader hands the model.

The paper cells' teachers read each caption's image, crop it, flip it and RandAugment it (2 ops) in the loader's
workers (mmdd.data.sample_augment), then collate batches of 128. This times that loader alone, on generated
photo-like JPEGs of Flickr30K's sizes (experiments/bench_decode.py's fixture), for both crop sources, several worker
counts, and with the workers kept between epochs or restarted (persistent_workers), 2 epochs each, and extrapolates
to Flickr30K's train epoch (145,000 caption examples). A teacher step that takes less than batch / rate seconds
waits for the loader (the first epoch of `mmdd buffer` measures and says so: mmdd.teachers.loader_watch).

    python experiments/bench_loader.py --images 1024 --workers 0 1 2 --out outputs/bench_loader.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import FLICKR_EXAMPLES, write_fixture  # noqa: E402

from mmdd.data.annotations import Split  # noqa: E402
from mmdd.data.splits import PairDataset, SplitData  # noqa: E402
from mmdd.data.image_cache import decoded_images  # noqa: E402
from mmdd.data.randaugment import BLIP_OPS, RandAugment  # noqa: E402
from mmdd.data.sample_augment import PerImageAugment  # noqa: E402


def epoch_rates(dataset, workers: int, persistent: bool, batch: int, epochs: int = 2) -> list[tuple[float, float]]:
    """(seconds to the first batch, images/s over the epoch) for each epoch."""
    kwargs = {"num_workers": workers}
    if workers:
        kwargs.update(persistent_workers=persistent, prefetch_factor=4)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0), **kwargs)
    out = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        first = None
        n = 0
        for images, _, _ in loader:
            first = first or time.perf_counter() - t0
            n += len(images)
        out.append((first, n / (time.perf_counter() - t0)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)  # what each worker gets; the main process only collates
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_fixture(tmp / "images", args.images)
        dec = decoded_images(paths, args.size, "squash", tmp / "cache", name="fixture")
        n = len(paths)
        split = SplitData(Split("fixture", image_paths=paths, captions=[f"c{i}" for i in range(n)],
                                txt2img=list(range(n))),
                          text_emb=torch.zeros(n, 8), image_size=args.size, images=torch.from_numpy(dec.pixels),
                          resize="squash", original_sizes=torch.from_numpy(dec.original_sizes))
        for crop_from in ("decoded", "original"):
            aug = PerImageAugment(args.size, (0.5, 1.0), (0.75, 4 / 3), True, RandAugment(2, 5, BLIP_OPS),
                                  crop_from=crop_from, resize="squash")
            dataset = PairDataset(split, unit="caption", augment=aug)
            for workers in args.workers:
                for persistent in ([True, False] if workers else [False]):
                    (first1, rate1), (first2, rate2) = epoch_rates(dataset, workers, persistent, args.batch)
                    rows.append((crop_from, workers, persistent, first1, first2, rate2))
                    print(rows[-1], flush=True)
    lines = [f"{args.images} generated JPEGs (Flickr30K's sizes), {args.size} px, batches of {args.batch}, crop + flip "
             f"+ RandAugment(2, 5) per image (data.augment.style=blip), 2 epochs; CPU: {os.cpu_count()} cores.", "",
             "| crop_from | workers | persistent | first batch, epoch 1 | first batch, epoch 2 | images/s (epoch 2) | "
             "Flickr30K epoch at that rate |", "|---|---|---|---|---|---|---|"]
    for crop_from, workers, persistent, first1, first2, rate in rows:
        lines.append(f"| {crop_from} | {workers} | {'yes' if persistent else 'no'} | {first1:.2f} s | {first2:.2f} s | "
                     f"{rate:.0f} | {FLICKR_EXAMPLES / rate / 60:.0f} min |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
