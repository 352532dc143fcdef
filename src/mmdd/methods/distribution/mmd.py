"""Maximum mean discrepancy on the unit hypersphere, as MDM uses it, and the first-moment distance of DM.

geodesic kernel   k(a, b) = exp(-theta(a, b)^2 / (2 sigma^2)), theta = arccos <a/|a|, b/|b|>, the great-circle
                  distance (clamped away from +-1, where arccos has an infinite derivative)
MMD^2             w * E[k(s, s')] + E[k(r, r')] - 2 E[k(s, r)] over synthetic s and real r:
                  unbiased: the within-set means leave out the diagonal (a U-statistic; MDM's code)
                  biased:   every pair, diagonal included (the V-statistic; MDM's project page writes this one)
GKE               sqrt(max(MMD^2, 0) + eps) (MDM's --sqrtmmd), or MMD^2 itself
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmdd.errors import MmddError

ESTIMATORS = ("unbiased", "biased")
COS_CLAMP = 1e-6  # cosines are clamped to [-1 + c, 1 - c] before arccos (MDM: 1e-6)
SQRT_EPS = 1e-12  # inside the square root of GKE, so its gradient is finite at MMD^2 = 0


def geodesic_kernel(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """[len(a), len(b)] Gaussian kernel of the great-circle distance between the directions of a's and b's rows."""
    cos = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()
    theta = torch.acos(cos.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP))
    return torch.exp(-theta.pow(2) / (2.0 * sigma**2))


def _within_mean(k: torch.Tensor, estimator: str) -> torch.Tensor:
    n = k.shape[0]
    if estimator == "biased":
        return k.mean()
    if n < 2:
        raise MmddError("the unbiased MMD estimator needs at least 2 samples per side (a synthetic batch of one "
                        "pair: budget 1); use a larger budget or batch, or method.estimator=biased")
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


def mmd2(synthetic: torch.Tensor, real: torch.Tensor, sigma: float, estimator: str = "unbiased",
         diversity_weight: float = 1.0) -> torch.Tensor:
    """MMD^2 between synthetic and real rows under the geodesic kernel; `diversity_weight` scales the synthetic
    within-set term (MDM's diversity_weight; 1 = the plain MMD)."""
    if estimator not in ESTIMATORS:
        raise MmddError(f"MMD estimator must be one of {ESTIMATORS}, got {estimator!r}")
    k_ss = geodesic_kernel(synthetic, synthetic, sigma)
    k_rr = geodesic_kernel(real, real, sigma)
    k_sr = geodesic_kernel(synthetic, real, sigma)
    return diversity_weight * _within_mean(k_ss, estimator) + _within_mean(k_rr, estimator) - 2.0 * k_sr.mean()


def gke(synthetic: torch.Tensor, real: torch.Tensor, sigma: float, estimator: str = "unbiased",
        diversity_weight: float = 1.0, sqrt: bool = True) -> torch.Tensor:
    """MDM's geodesic kernel embedding distance: the square root of MMD^2 (clamped at 0; the unbiased estimate can
    be negative), or MMD^2 itself with sqrt=False."""
    m = mmd2(synthetic, real, sigma, estimator, diversity_weight)
    return torch.sqrt(m.clamp_min(0.0) + SQRT_EPS) if sqrt else m


def mean_distance(synthetic: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """DM's loss: squared euclidean distance of the two batches' mean embeddings."""
    return (synthetic.mean(0) - real.mean(0)).pow(2).sum()


def agreement_and_disparity(z_image: torch.Tensor, z_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MDM's joint views of a pair: u = norm(z_v + z_t) (what image and text agree on), g = norm(z_v - z_t)."""
    return F.normalize(z_image + z_text, dim=-1), F.normalize(z_image - z_text, dim=-1)
