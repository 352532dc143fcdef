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
    sims = sims.float()
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
    """Recall percentages `ir1 ir5 ir10 tr1 tr5 tr10 r_mean` for an [n_images, n_captions] matrix."""
    tr_rank, ir_rank = retrieval_ranks(sims, txt2img)
    out: dict[str, float] = {}
    for k in RECALL_KS:
        out[f"ir{k}"] = 100.0 * (ir_rank < k).float().mean().item()
    for k in RECALL_KS:
        out[f"tr{k}"] = 100.0 * (tr_rank < k).float().mean().item()
    out["r_mean"] = sum(out[f"{m}{k}"] for m in ("ir", "tr") for k in RECALL_KS) / 6.0
    return out
