"""Inner (student/teacher) losses on a logits matrix [B, B] whose diagonal holds the pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_infonce(logits: torch.Tensor) -> torch.Tensor:
    """CLIP loss: mean of image->text and text->image cross-entropy with diagonal targets."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
