"""Numerical checks of the trajectory-matching core against plain reference computations."""

import pytest
import torch

from mmdd.methods.trajectory.unrolling import BatchSchedule, matching_loss, unroll_full
from mmdd.models.functional import ParamLayout
from mmdd.models.convnet import ConvNet
from mmdd.models.dual_encoder import DualEncoder
from mmdd.models.losses import symmetric_infonce


def tiny_model(seed=0):
    torch.manual_seed(seed)
    bb = ConvNet(image_size=8, width=3, depth=1)
    m = DualEncoder(bb, bb.num_features, text_dim=5).double()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def setup(seed=0, n=4):
    m = tiny_model(seed)
    lay = ParamLayout.from_model(m)
    named = dict(m.named_parameters())
    start = {k: lay.flatten(named, k) for k in ("image", "text")}
    g = torch.Generator().manual_seed(seed + 1)
    target = {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in start.items()}
    images = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    texts = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return m, lay, start, target, images, texts


def loss_of(m, lay, start, target, images, texts, lrs, steps=3, batch=2, merged=False):
    schedule = BatchSchedule(images.shape[0], batch, torch.Generator().manual_seed(7))
    final = unroll_full(m, lay, start, lrs, images, texts, schedule, steps, lambda lg, idx: symmetric_infonce(lg))
    return matching_loss(final, start, target, merged=merged)[0]


def test_layout_round_trip():
    m = tiny_model()
    lay = ParamLayout.from_model(m)
    named = dict(m.named_parameters())
    flats = {k: lay.flatten(named, k) for k in ("image", "text")}
    back = lay.unflatten(flats)
    assert set(back) == set(lay.names["image"] + lay.names["text"])
    for n, t in back.items():
        assert torch.equal(t, named[n])


def test_unroll_equals_plain_sgd_on_the_module():
    """The functional unroll must take exactly the SGD steps a plain nn.Module loop takes."""
    m, lay, start, target, images, texts = setup()
    lrs = {"image": torch.tensor(0.3, dtype=torch.float64), "text": torch.tensor(0.2, dtype=torch.float64)}
    schedule = BatchSchedule(4, 2, torch.Generator().manual_seed(7))
    final = unroll_full(m, lay, start, lrs, images, texts, schedule, 3, lambda lg, idx: symmetric_infonce(lg))

    ref = tiny_model()
    for p in ref.parameters():
        p.requires_grad_(True)
    names = ref.modality_parameter_names()
    sched = BatchSchedule(4, 2, torch.Generator().manual_seed(7))
    for _ in range(3):
        idx = sched.next()
        ref.zero_grad()
        symmetric_infonce(ref(images[idx], texts[idx])).backward()
        with torch.no_grad():
            for mod in ("image", "text"):
                for n in names[mod]:
                    p = dict(ref.named_parameters())[n]
                    p -= lrs[mod] * p.grad
    ref_flat = {k: lay.flatten(dict(ref.named_parameters()), k) for k in ("image", "text")}
    for k in ("image", "text"):
        assert torch.allclose(final[k], ref_flat[k], atol=1e-10)


@pytest.mark.parametrize("merged", [False, True])
def test_meta_gradient_matches_finite_differences(merged):
    m, lay, start, target, images, texts = setup()
    images.requires_grad_(True)
    texts.requires_grad_(True)
    lrs = {k: torch.tensor(0.5, dtype=torch.float64, requires_grad=True) for k in ("image", "text")}
    loss = loss_of(m, lay, start, target, images, texts, lrs, merged=merged)
    g_img, g_txt, g_lri, g_lrt = torch.autograd.grad(loss, [images, texts, lrs["image"], lrs["text"]])

    def f(imgs=images, txts=texts, lr_i=lrs["image"], lr_t=lrs["text"]):
        with torch.no_grad():
            pass
        return loss_of(m, lay, start, target, imgs.detach(), txts.detach(),
                       {"image": lr_i.detach(), "text": lr_t.detach()}, merged=merged).item()

    eps = 1e-6
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        i = int(torch.randint(images.numel(), (1,), generator=gen))
        d = torch.zeros_like(images).view(-1)
        d[i] = eps
        d = d.view_as(images)
        fd = (f(imgs=images + d) - f(imgs=images - d)) / (2 * eps)
        assert g_img.view(-1)[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-9)
        j = int(torch.randint(texts.numel(), (1,), generator=gen))
        d = torch.zeros_like(texts).view(-1)
        d[j] = eps
        d = d.view_as(texts)
        fd = (f(txts=texts + d) - f(txts=texts - d)) / (2 * eps)
        assert g_txt.view(-1)[j].item() == pytest.approx(fd, rel=1e-4, abs=1e-9)
    fd = (f(lr_i=lrs["image"] + eps) - f(lr_i=lrs["image"] - eps)) / (2 * eps)
    assert g_lri.item() == pytest.approx(fd, rel=1e-4, abs=1e-9)
    fd = (f(lr_t=lrs["text"] + eps) - f(lr_t=lrs["text"] - eps)) / (2 * eps)
    assert g_lrt.item() == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_matching_loss_definition():
    start = {"image": torch.tensor([0.0, 0.0]), "text": torch.tensor([1.0])}
    target = {"image": torch.tensor([2.0, 0.0]), "text": torch.tensor([3.0])}
    final = {"image": torch.tensor([1.0, 0.0]), "text": torch.tensor([3.0])}
    sep, terms = matching_loss(final, start, target, merged=False)
    assert terms["image"].item() == pytest.approx(1 / 4) and terms["text"].item() == pytest.approx(0.0)
    assert sep.item() == pytest.approx(0.25)
    merged, _ = matching_loss(final, start, target, merged=True)
    assert merged.item() == pytest.approx(1 / (4 + 4))


def test_batch_schedule_covers_permutation_then_redraws():
    s = BatchSchedule(6, 4, torch.Generator().manual_seed(0))
    a = s.next()
    b = s.next()  # only 2 left in the permutation -> a fresh permutation
    assert len(a) == 4 and len(b) == 4 and len(set(a.tolist())) == 4
    full = BatchSchedule(5, None)
    assert sorted(full.next().tolist()) == [0, 1, 2, 3, 4]
