"""Kernels and discrepancies of distribution matching (mmdd.methods.distribution.mmd): the geodesic kernel,
the MMD estimators and GKE by hand, their gradients, and DM's mean distance."""

from __future__ import annotations

import math

import pytest
import torch

from mmdd.errors import MmddError
from mmdd.methods.distribution.mmd import agreement_and_disparity, geodesic_kernel, gke, mean_distance, mmd2

E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def k(theta: float, sigma: float) -> float:
    return math.exp(-theta**2 / (2 * sigma**2))


def test_geodesic_kernel_is_a_gaussian_of_the_great_circle_distance():
    a = torch.stack([E1, E2, -E1, torch.tensor([1.0, 1.0])])
    got = geodesic_kernel(a, torch.stack([3 * E1]), sigma=0.5).flatten()  # lengths do not matter, directions do
    # theta = 0 is clamped to acos(1 - 1e-6) = 1.414e-3 rad, and pi to pi - 1.414e-3
    eps = math.acos(1 - 1e-6)
    want = [k(eps, 0.5), k(math.pi / 2, 0.5), k(math.pi - eps, 0.5), k(math.pi / 4, 0.5)]
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_mmd_estimators_by_hand():
    s, r, sigma = torch.stack([E1, E2]), torch.stack([E1, -E1]), 1.0
    same = k(math.acos(1 - 1e-6), sigma)  # a point with itself (the clamp)
    ss = k(math.pi / 2, sigma)  # e1 vs e2
    rr = k(math.pi - math.acos(1 - 1e-6), sigma)  # e1 vs -e1
    sr = (same + rr + ss + ss) / 4  # e1-e1, e1-(-e1), e2-e1, e2-(-e1)
    assert float(mmd2(s, r, sigma, "unbiased")) == pytest.approx(ss + rr - 2 * sr, rel=1e-5)
    assert float(mmd2(s, r, sigma, "biased")) == pytest.approx((2 * same + 2 * ss) / 4 + (2 * same + 2 * rr) / 4 - 2 * sr,
                                                               rel=1e-5)
    assert float(mmd2(s, r, sigma, "unbiased", diversity_weight=0.5)) == pytest.approx(0.5 * ss + rr - 2 * sr, rel=1e-5)


def test_gke_is_zero_for_one_distribution_and_its_gradient_stays_finite():
    x = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    assert float(mmd2(x, x, 0.5, "biased")) == pytest.approx(0.0, abs=1e-6)
    assert float(mmd2(x, x, 0.5, "unbiased")) < 0  # the U-statistic of identical samples: below zero ...
    y = x.clone().requires_grad_(True)
    g = gke(y, x, 0.5, "unbiased")
    assert float(g) == pytest.approx(1e-6)  # ... clamped at 0 under the root (sqrt(0 + 1e-12))
    gke(y, x, 0.5, "biased").backward()  # theta = 0 everywhere: arccos' derivative is infinite without the clamp
    assert torch.isfinite(y.grad).all()
    with pytest.raises(MmddError, match="at least 2 samples"):
        mmd2(x[:1], x, 0.5, "unbiased")


def test_gke_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: gke(a, r, 0.7, "unbiased"), (s,))


def test_dm_mean_distance_and_the_joint_views():
    assert float(mean_distance(torch.tensor([[0.0, 2.0], [2.0, 0.0]]), torch.tensor([[0.0, 0.0]]))) == 2.0
    # means (2, 2) and (0, 1): the squared distance 2^2 + 1^2 = 5 (not |2| + |1| = 3, nor its root 2.24)
    assert float(mean_distance(torch.tensor([[1.0, 4.0], [3.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))) == 5.0
    u, g = agreement_and_disparity(E1[None], E2[None])
    assert u.flatten().tolist() == pytest.approx([2**-0.5, 2**-0.5])
    assert g.flatten().tolist() == pytest.approx([2**-0.5, -(2**-0.5)])


def test_dm_loss_is_the_weighted_sum_of_its_four_mean_distances_by_hand():
    """Unit embeddings along the axes: synthetic image e1, text e2; real image e2, text e1. Per modality the means
    differ by e1 - e2 (squared distance 2); u = norm(e1 + e2) is the same on both sides (0), g = norm(e1 - e2) flips
    sign (distance |2 g|^2 = 4)."""
    from helpers import method_settings
    from mmdd.methods.distribution.objective import DMLoss, DMSettings

    settings = method_settings(DMSettings, "dm", lambda_image=1.0, lambda_text=0.5, lambda_agr=3.0, lambda_dis=0.25)
    loss, terms = DMLoss(settings)(E1[None], E2[None], E2[None], E1[None])
    assert {k: float(v) for k, v in terms.items()} == pytest.approx({"image": 2.0, "text": 2.0, "agr": 0.0, "dis": 4.0})
    assert float(loss) == pytest.approx(1.0 * 2 + 0.5 * 2 + 3.0 * 0 + 0.25 * 4)
    features = method_settings(DMSettings, "dm", space="features", lambda_agr=0.0, lambda_dis=0.0)
    loss, terms = DMLoss(features)(E1[None], 3 * E2[None], E2[None], E1[None])
    assert set(terms) == {"image", "text"} and float(terms["text"]) == pytest.approx(9 + 1)  # unnormalised
