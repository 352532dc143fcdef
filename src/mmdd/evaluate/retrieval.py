"""Image-text retrieval metrics (BLIP definition).

TR@K: % of images whose best-ranked ground-truth caption is among the top K captions.
IR@K: % of captions whose image is among the top K images.
A ground truth's rank is the number of *other* candidates scoring >= it, so ties count
against the query (a constant similarity matrix scores 0 rather than 100).
"""

from __future__ import annotations

import torch

RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("ir1", "ir5", "ir10", "tr1", "tr5", "tr10", "r_mean")


def _check_inputs(sims: torch.Tensor, txt2img: torch.Tensor) -> None:
    if sims.dim() != 2:
        raise ValueError(f"sims must be [n_images, n_captions], got shape {tuple(sims.shape)}")
    if txt2img.dim() != 1 or txt2img.numel() != sims.shape[1]:
        raise ValueError(
            f"txt2img must have one entry per caption ({sims.shape[1]}), got shape {tuple(txt2img.shape)}"
        )
    if txt2img.numel() and (txt2img.min() < 0 or txt2img.max() >= sims.shape[0]):
        raise ValueError("txt2img holds an image index outside [0, n_images)")
    if sims.isnan().any():
        raise ValueError("sims contains NaN")


@torch.no_grad()
def retrieval_ranks(
    sims: torch.Tensor, txt2img: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (image ranks for TR [n_images], caption ranks for IR [n_captions]); 0 = best.

    Works in chunks so COCO-sized matrices (5k x 25k) stay within memory.
    """
    sims = sims if sims.dtype == torch.float64 else sims.float()  # float64 scores (numerical checks) stay float64
    txt2img = txt2img.long().to(sims.device)
    _check_inputs(sims, txt2img)
    n_img, n_cap = sims.shape

    # IR: for caption j the ground-truth score is sims[txt2img[j], j].
    gt_ir = sims.gather(0, txt2img.view(1, -1)).squeeze(0)  # [n_cap]
    ir_rank = torch.empty(n_cap, dtype=torch.long, device=sims.device)
    for s in range(0, n_cap, chunk):
        block = sims[:, s : s + chunk]
        ir_rank[s : s + chunk] = (block >= gt_ir[s : s + chunk]).sum(0) - 1

    # TR: the best ground-truth caption of image i decides; its rank is the count of
    # captions scoring >= its score, minus itself.
    tr_rank = torch.empty(n_img, dtype=torch.long, device=sims.device)
    has_caption = torch.zeros(n_img, dtype=torch.bool, device=sims.device)
    has_caption[txt2img] = True
    for s in range(0, n_img, chunk):
        block = sims[s : s + chunk]  # [b, n_cap]
        rows = torch.arange(s, s + block.shape[0], device=sims.device)
        is_gt = txt2img.view(1, -1) == rows.view(-1, 1)
        best_gt = block.masked_fill(~is_gt, float("-inf")).max(1).values
        tr_rank[s : s + chunk] = (block >= best_gt.view(-1, 1)).sum(1) - 1
    # An image without captions cannot be retrieved against; count it as a miss.
    tr_rank[~has_caption] = n_cap
    return tr_rank, ir_rank


def retrieval_metrics(sims: torch.Tensor, txt2img: torch.Tensor) -> dict[str, float]:
    """Recall percentages `ir1 ir5 ir10 tr1 tr5 tr10 r_mean` for an [n_images, n_captions] matrix.

    Computed in double precision as the reference code's itm_eval does (100.0 * hits / queries; r_mean the mean of
    the text and the image means), so equal recalls are equal numbers: a float32 mean made 5 of 500 0.99999998 and
    let rounding decide between two evaluations with the same r_mean."""
    tr_rank, ir_rank = retrieval_ranks(sims, txt2img)
    out: dict[str, float] = {}
    for k in RECALL_KS:
        out[f"ir{k}"] = 100.0 * int((ir_rank < k).sum()) / ir_rank.numel()
    for k in RECALL_KS:
        out[f"tr{k}"] = 100.0 * int((tr_rank < k).sum()) / tr_rank.numel()
    means = [sum(out[f"{m}{k}"] for k in RECALL_KS) / len(RECALL_KS) for m in ("tr", "ir")]
    out["r_mean"] = (means[0] + means[1]) / 2
    return out


def chance_metrics(txt2img: torch.Tensor, n_images: int) -> tuple[dict[str, float], float]:
    """What a model whose similarities are a random order scores on this split: (the expected value of each metric,
    an upper bound on the standard deviation of r_mean).

    IR@K: each caption's image ranks uniformly among the n images, so a hit has probability min(K, n)/n. TR@K: image
    i with c of the C captions is a hit when one of its c captions is among the first K of a random order,
    1 - C(C-c, K)/C(C, K); an image without captions always misses. Queries are independent, so each recall's
    variance is the sum of its queries' p(1-p) over the squared count; the six recalls of r_mean are correlated
    (nested K), and the mean of their standard deviations bounds r_mean's from above.
    """
    import math

    caps = torch.bincount(txt2img.long().cpu(), minlength=n_images).tolist()
    n_cap = len(txt2img)
    mean: dict[str, float] = {}
    sds: list[float] = []
    for k in RECALL_KS:
        p = min(k, n_images) / n_images
        mean[f"ir{k}"] = 100.0 * p
        sds.append(100.0 * math.sqrt(p * (1 - p) / n_cap))
    for k in RECALL_KS:
        ps = []
        for c in caps:
            if c == 0:
                ps.append(0.0)
                continue
            # C(C-c, K)/C(C, K) = prod_{j<K} (C-c-j)/(C-j): no huge binomials
            miss = 1.0
            for j in range(min(k, n_cap)):
                miss *= max(n_cap - c - j, 0) / (n_cap - j)
            ps.append(1.0 - miss)
        mean[f"tr{k}"] = 100.0 * sum(ps) / n_images
        sds.append(100.0 * math.sqrt(sum(p * (1 - p) for p in ps)) / n_images)
    mean["r_mean"] = sum(mean[f"{m}{k}"] for m in ("ir", "tr") for k in RECALL_KS) / 6.0
    return mean, sum(sds) / len(sds)


def chance_report(txt2img: torch.Tensor, n_images: int, r_means: list[float]) -> dict:
    """How test r_means compare with a random ranking of the split: a model scoring no better than chance + 3 (upper
    bounds of the) standard deviations of chance is "at chance". Every student of a set at chance means the set taught
    them nothing (diverged pixels, a wrong learning rate, an empty store): worth a warning, never silence."""
    mean, sd = chance_metrics(txt2img, n_images)
    threshold = mean["r_mean"] + 3 * sd
    at = sum(r <= threshold for r in r_means)
    return {"r_mean": mean["r_mean"], "threshold": threshold, "at_chance": at, "of": len(r_means),
            "all_at_chance": bool(r_means) and at == len(r_means)}
