"""LoRS pieces: soft-label losses on hand-computed cases, the learned similarity, and its meta-gradient."""

import math

import pytest
import torch

from mmdd.methods.trajectory.unrolling import BatchSchedule
from mmdd.methods.trajectory.meta_gradient import Segment, full_unroll, tesla
from mmdd.models.losses import multilabel_infonce, pair_loss, soft_bce, soft_ce, soft_mse, lors_kl, symmetric_infonce, weighted_bce
from mmdd.synthetic.similarity import FullSimilarity, LowRankSimilarity
from mmdd.synthetic.synthetic_set import SyntheticSet
from test_matching import setup


def bce(x, s):
    p = 1 / (1 + math.exp(-x))
    return -(s * math.log(p) + (1 - s) * math.log(1 - p))


def test_weighted_bce_averages_positives_and_negatives_separately():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    S = torch.tensor([[1.0, 0.2], [0.0, 0.9]])
    pos = (bce(2.0, 1.0) + bce(3.0, 0.9)) / 2
    neg = (bce(-1.0, 0.2) + bce(0.5, 0.0)) / 2
    assert weighted_bce(logits, S).item() == pytest.approx((pos + neg) / 2, rel=1e-6)
    everything = (bce(2.0, 1.0) + bce(3.0, 0.9) + bce(-1.0, 0.2) + bce(0.5, 0.0)) / 4
    assert soft_bce(logits, S).item() == pytest.approx(everything, rel=1e-6)


def test_weighted_bce_is_finite_for_saturated_logits():
    logits = torch.tensor([[1 / 0.07, -1 / 0.07], [-1 / 0.07, 1 / 0.07]], requires_grad=True)
    loss = weighted_bce(logits, torch.eye(2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_multilabel_infonce_reduces_to_infonce_for_identity_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, generator=g)
    assert multilabel_infonce(logits, torch.eye(5)).item() == pytest.approx(symmetric_infonce(logits).item(), rel=1e-6)
    assert pair_loss("infonce", logits, None).item() == pytest.approx(symmetric_infonce(logits).item())


def test_kl_loss_hand_computed_and_bounded():
    # 2x2, logits 0 everywhere -> log softmax = log(1/2) per entry; S = I, tau = 1:
    # targets softmax([1, 0]) = [e/(e+1), 1/(e+1)] sum to 1, so the loss is log 2 in both directions.
    assert soft_ce(torch.zeros(2, 2), torch.eye(2), 1.0).item() == pytest.approx(math.log(2))
    # logits [[2, 0], [0, 2]], S = I, tau = 1: rows give -(p log q) with p = (e, 1)/(e+1), q = softmax(2, 0).
    p = torch.tensor([math.e, 1.0]) / (math.e + 1)
    logq = torch.log_softmax(torch.tensor([2.0, 0.0]), 0)
    expected = -(p * logq).sum().item()
    assert soft_ce(2 * torch.eye(2), torch.eye(2), 1.0).item() == pytest.approx(expected, rel=1e-6)
    # Targets are a distribution whatever S is, so S with negative entries cannot drive it below 0,
    # unlike multi-label InfoNCE whose raw-S targets make it unbounded below.
    s = torch.tensor([[1.0, -3.0], [-3.0, 1.0]])
    logits = torch.tensor([[20.0, -20.0], [-20.0, 20.0]])
    assert soft_ce(logits, s, 0.1).item() >= 0
    assert multilabel_infonce(logits, s).item() < 0
    # tau -> small: hard targets, InfoNCE; through pair_loss with the temperature passed on.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, generator=g)
    assert pair_loss("soft_ce", logits, None, 1e-3).item() == pytest.approx(symmetric_infonce(logits).item(), rel=1e-5)


def test_kl_is_lors_kldivloss_mean_hand_computed():
    """LoRS's "KL": KLDivLoss(reduction="mean") = sum over the B x B entries of p (log p - log q), divided by B^2."""
    # 2x2, logits 0 -> q = 1/2 everywhere; S = I, tau = 1 -> p rows (e, 1)/(e+1) and (1, e)/(e+1)
    p = torch.tensor([math.e, 1.0]) / (math.e + 1)
    row_kl = (p * (p.log() - math.log(0.5))).sum().item()  # the same for both rows and both directions
    assert pair_loss("kl", torch.zeros(2, 2), torch.eye(2), 1.0).item() == pytest.approx(2 * row_kl / 4, rel=1e-6)
    # its gradient in the logits is 1/B of soft_ce's (the targets' entropy is a constant)
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    s = torch.rand(5, 5, generator=torch.Generator().manual_seed(2))
    (g_kl,) = torch.autograd.grad(lors_kl(logits, s, 0.1), logits)
    (g_ce,) = torch.autograd.grad(soft_ce(logits, s, 0.1), logits)
    assert torch.allclose(g_kl * 5, g_ce, atol=1e-7)


def test_mse_and_hard_target_default():
    logits = torch.zeros(2, 2)
    assert soft_mse(logits, torch.eye(2)).item() == pytest.approx(0.25)
    assert pair_loss("wbce", logits, None).item() == pytest.approx(weighted_bce(logits, torch.eye(2)).item())
    with pytest.raises(ValueError, match="unknown inner loss"):
        pair_loss("hinge", logits, torch.eye(2))


def test_similarity_starts_at_identity_and_indexes_blocks():
    low = LowRankSimilarity(6, rank=3, alpha=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(low.matrix(), torch.eye(6))
    with torch.no_grad():
        low.right.normal_(generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([4, 1, 2])
    assert torch.allclose(low.matrix(idx), low.matrix()[idx][:, idx])
    expected = torch.diag(low.diag) + (2.0 / 3) * (low.left @ low.right.t())
    assert torch.allclose(low.matrix(), expected, atol=1e-6)  # float32: entries near 0 round differently
    full = FullSimilarity(4)
    assert torch.equal(full.matrix(torch.tensor([0, 3])), torch.eye(2))


def test_similarity_survives_save_and_load(tmp_path):
    low = LowRankSimilarity(3, rank=2, alpha=1.0)
    with torch.no_grad():
        low.right.normal_()
    syn = SyntheticSet(torch.randn(3, 3, 8, 8), torch.randn(3, 4), {"image": 0.1, "text": 0.1}, low)
    syn.save(tmp_path / "s", {"inner_loss": "wbce"})
    back, manifest = SyntheticSet.load(tmp_path / "s")
    assert manifest["similarity"] == {"kind": "lowrank", "rank": 2, "alpha": 1.0}
    assert torch.allclose(back.similarity_matrix(), syn.similarity_matrix())


def lors_segment(steps, seed=0):
    m, lay, start, target, images, texts = setup(seed, n=4)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    sim = LowRankSimilarity(4, rank=2, alpha=1.0, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        sim.right.normal_(generator=torch.Generator().manual_seed(4))
    lrs = {k: torch.tensor(0.4, dtype=torch.float64, requires_grad=True) for k in start}

    def inner(logits, idx):
        return weighted_bce(logits, sim.matrix(idx))

    seg = Segment(m, lay, start, target, lrs, images, texts, BatchSchedule(4, 2, torch.Generator().manual_seed(5)),
                  steps, inner, extra=tuple(sim.parameters()))
    return seg, sim


def grads_of(strategy, steps):
    seg, sim = lors_segment(steps)
    strategy(seg, lambda t, inputs: t.backward(inputs=inputs))
    return [seg.images.grad, seg.texts.grad, *(p.grad for p in sim.parameters()), *(v.grad for v in seg.lrs.values())]


def test_lors_tesla_equals_full_unroll_for_one_step_including_S():
    full = grads_of(full_unroll, 1)
    tes = grads_of(tesla, 1)
    for a, b in zip(full, tes):
        assert a is not None and b is not None
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)
    assert full[2].abs().sum() > 0 and full[4].abs().sum() > 0  # S's diag and R receive gradient


def test_S_gradient_matches_finite_differences():
    seg, sim = lors_segment(2)
    full_unroll(seg, lambda t, inputs: t.backward(inputs=inputs))
    analytic = sim.right.grad[1, 0].item()

    def loss_with(delta):
        s2, sim2 = lors_segment(2)
        with torch.no_grad():
            sim2.right[1, 0] += delta
        from mmdd.methods.trajectory.unrolling import matching_loss, unroll_full

        final = unroll_full(s2.model, s2.layout, s2.start, {k: v.detach() for k, v in s2.lrs.items()}, s2.images.detach(),
                            s2.texts.detach(), s2.schedule, 2, s2.inner_loss)
        return matching_loss(final, s2.start, s2.target)[0].item()

    eps = 1e-6
    assert analytic == pytest.approx((loss_with(eps) - loss_with(-eps)) / (2 * eps), rel=1e-4, abs=1e-10)
