"""Inner (student/teacher) losses on a logits matrix [B, B] whose diagonal holds the pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


# How a set's students train when its method says nothing else (coresets; manifests written before these fields).
DEFAULT_INNER_LOSS = "infonce"
DEFAULT_LABEL_TEMPERATURE = 0.1  # tau of the soft_ce/kl targets softmax(S / tau)


def symmetric_infonce(logits: torch.Tensor) -> torch.Tensor:
    """CLIP loss: mean of image->text and text->image cross-entropy with diagonal targets."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


# --- soft-label losses against a target similarity matrix S [B, B] (LoRS) -------------------
def weighted_bce(logits: torch.Tensor, target: torch.Tensor, log_eps: float | None = None) -> torch.Tensor:
    """BCE of sigmoid(logits) vs S, averaged over positives (S > 0.5) and negatives separately, then halved.

    Written with logsigmoid, so saturated logits (|x| = 1/T ~ 14) stay finite and exact. `log_eps`: the reference
    code's form instead (LoRS src/similarity_mining.py, RepBlend the same): log(sigmoid(x) + eps) and
    log(1 - sigmoid(x) + eps) with eps = 1e-6, and eps added to the positives' and negatives' counts. Where a pair
    saturates (1 - p or p below about eps) that eps shrinks the loss's gradient, so the two differ in what they
    compute, not only in rounding (experiments/parity.md).
    """
    pos = (target > 0.5).detach()
    neg = ~pos
    zero = logits.new_zeros(())
    if log_eps is None:
        loss = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits))
        n_pos, n_neg = pos.sum().clamp_min(1), neg.sum().clamp_min(1)
    else:
        p = torch.sigmoid(logits)
        loss = -target * torch.log(p + log_eps) - (1 - target) * torch.log(1 - p + log_eps)
        n_pos, n_neg = pos.sum() + log_eps, neg.sum() + log_eps
    loss_pos = torch.where(pos, loss, zero).sum() / n_pos
    loss_neg = torch.where(neg, loss, zero).sum() / n_neg
    return 0.5 * (loss_pos + loss_neg)


def soft_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain BCE of sigmoid(logits) vs S, mean over all entries."""
    return -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()


def multilabel_infonce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-sum_j S_ij log softmax(logits)_ij, mean over rows, both directions averaged."""
    rows = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    cols = -(target.t() * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (rows + cols)


def soft_ce(logits: torch.Tensor, target: torch.Tensor, label_temperature: float = DEFAULT_LABEL_TEMPERATURE) -> torch.Tensor:
    """Cross-entropy of softmax(logits) against softmax(S / tau) per row, mean over rows, both directions averaged.

    Unlike multi-label InfoNCE, softmax(S / tau) is a distribution whatever S becomes (entries > 1 or < 0),
    so the loss stays bounded below; with S = I and tau = 0.1 it is InfoNCE with ~1% label smoothing.
    mmdd's soft-label loss (it was called `kl` before 2026-11): LoRS's "KL" (`lors_kl`) has the same targets but
    is the KL itself (the targets' entropy apart, a constant in the logits) averaged over all B x B entries, so
    its gradient is 1/B of this one's.
    """

    def one_side(lg: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
        return -(F.softmax(tg / label_temperature, dim=1) * F.log_softmax(lg, dim=1)).sum(1).mean()

    return 0.5 * (one_side(logits, target) + one_side(logits.t(), target.t()))


def lors_kl(logits: torch.Tensor, target: torch.Tensor, label_temperature: float = DEFAULT_LABEL_TEMPERATURE) -> torch.Tensor:
    """LoRS's "KL" loss exactly (src/similarity_mining.py): KLDivLoss(reduction="mean") of log_softmax(logits) against
    softmax(S / tau), i.e. the summed KL divided by B^2 entries, both directions averaged."""

    def one_side(lg: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(lg, dim=1), F.softmax(tg / label_temperature, dim=1), reduction="mean")

    return 0.5 * (one_side(logits, target) + one_side(logits.t(), target.t()))


def soft_mse(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between sigmoid(logits) and S."""
    return F.mse_loss(torch.sigmoid(logits), target)


SOFT_LOSSES = {"wbce": weighted_bce, "bce": soft_bce, "infonce": multilabel_infonce, "soft_ce": soft_ce, "kl": lors_kl,
               "mse": soft_mse}
# The options each soft loss takes (pair_loss's keyword arguments).
LOSS_OPTIONS = {"soft_ce": ("label_temperature",), "kl": ("label_temperature",), "wbce": ("log_eps",)}
INNER_LOSSES = ("infonce", *(k for k in SOFT_LOSSES if k != "infonce"))


def pair_loss(name: str, logits: torch.Tensor, target: torch.Tensor | None, label_temperature: float = DEFAULT_LABEL_TEMPERATURE,
              log_eps: float | None = None) -> torch.Tensor:
    """The inner loss `name` on logits; `target` is the batch's S (None: hard pairs, S = I).

    `label_temperature` is the tau of `soft_ce` and `kl` (softmax(S / tau) targets); the other losses ignore it.
    `log_eps`: wbce in the reference code's form (see weighted_bce); the other losses ignore it.
    """
    if target is None:
        if name == "infonce":
            return symmetric_infonce(logits)
        target = torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
    if name not in SOFT_LOSSES:
        raise ValueError(f"unknown inner loss {name!r}; choose from {sorted(SOFT_LOSSES)}")
    options = {"label_temperature": label_temperature, "log_eps": log_eps}
    return SOFT_LOSSES[name](logits, target, **{k: options[k] for k in LOSS_OPTIONS.get(name, ())})
