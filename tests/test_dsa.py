"""DSA (mmdd.methods.distribution.dsa): each family against a hand-made case, the Siamese property (one drawn
transformation, every image alike), gradients to the pixels, and the settings' checks."""

import math

import pytest
import torch

from mmdd.errors import MmddError
from mmdd.methods.distribution.dsa import FAMILIES, DSASettings, SiameseAugment

STANDARD = dict(strategy="color_crop_cutout_flip_scale_rotate", mode="single", brightness=1.0, saturation=2.0,
                contrast=0.5, ratio_crop_pad=0.125, ratio_cutout=0.5, prob_flip=0.5, ratio_scale=1.2,
                ratio_rotate=15.0)


def augment(**changes) -> SiameseAugment:
    return SiameseAugment(DSASettings(**{**STANDARD, **changes}))


def grid(n=4) -> torch.Tensor:
    return torch.arange(2 * 3 * n * n, dtype=torch.float64).reshape(2, 3, n, n)


def test_crop_translates_and_fills_the_border_with_zeros():
    x = grid()
    out = augment().apply(x, [("crop", {"dx": 1, "dy": 0})])
    assert torch.equal(out[:, :, :3], x[:, :, 1:]) and torch.equal(out[:, :, 3], torch.zeros(2, 3, 4, dtype=x.dtype))
    out = augment().apply(x, [("crop", {"dx": 0, "dy": -1})])
    assert torch.equal(out[..., 1:], x[..., :3]) and not out[..., 0].any()


def test_cutout_zeroes_a_square_of_half_the_side_around_the_drawn_centre():
    x = grid() + 1  # no zero pixel before
    # 4 px, ratio 0.5: a 2 x 2 square; an even side has 5 centre positions (DSA: randint(0, 4 + 1)); 2/5 -> centre 2
    out = augment().apply(x, [("cutout", {"cx": 0.45, "cy": 0.0})])
    zero = (out == 0).all(dim=(0, 1))
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[1:3, 0:1] = True  # rows 1-2; columns -1..0 clipped to 0
    assert torch.equal(zero, want)


def test_flip_scale_and_rotate():
    x = grid()
    assert torch.equal(augment().apply(x, [("flip", {"flip": 1.0})]), x.flip(3))
    assert torch.equal(augment().apply(x, [("flip", {"flip": 0.0})]), x)
    assert torch.allclose(augment().apply(x, [("scale", {"sx": 1.0, "sy": 1.0})]), x, atol=1e-9)
    assert torch.allclose(augment().apply(x, [("rotate", {"angle": 0.0})]), x, atol=1e-9)
    # a quarter turn maps pixel centres onto pixel centres (align_corners): torch.rot90's direction
    assert torch.allclose(augment().apply(x, [("rotate", {"angle": math.pi / 2})]), torch.rot90(x, 1, (2, 3)),
                          atol=1e-9)
    # scale 1/2 in x reads the middle half of each row: output column 0 (x = -1) samples the input at x = -0.5,
    # pixel 0.75 of 0..3
    half = augment().apply(x, [("scale", {"sx": 0.5, "sy": 1.0})])
    assert torch.allclose(half[..., 0], x[..., 0] + 0.75 * (x[..., 1] - x[..., 0]), atol=1e-9)


def test_color_by_hand():
    x = torch.tensor([[[[1.0]], [[2.0]], [[6.0]]]], dtype=torch.float64)  # one pixel, three channels
    neutral = {"brightness": 0.5, "saturation": 0.5, "contrast": 0.5}  # +0, x1 about the mean, x1 about the mean
    assert torch.allclose(augment().apply(x, [("color", neutral)]), x)
    # brightness +0.5; saturation x0 (every channel to the pixel's channel mean 3.5); contrast about the image mean
    out = augment().apply(x, [("color", {"brightness": 1.0, "saturation": 0.0, "contrast": 0.5})])
    assert torch.allclose(out, torch.full_like(x, 3.5))
    # saturation x2 (u = 1 with saturation 2): 3 + 2 (x - 3); contrast u = 1: x1.5 about the image mean 3
    out = augment().apply(x, [("color", {"brightness": 0.5, "saturation": 1.0, "contrast": 1.0})])
    sat = 3 + 2 * (x - 3)
    assert torch.allclose(out, sat.mean() + 1.5 * (sat - sat.mean()))


def test_one_draw_transforms_every_image_of_both_batches_alike_and_is_differentiable():
    aug = augment(mode="all")
    gen = torch.Generator().manual_seed(3)
    drawn = aug.draw(gen, 8, 8)
    assert [family for family, _ in drawn] == list(FAMILIES)
    real, syn = torch.randn(5, 3, 8, 8), torch.randn(2, 3, 8, 8, requires_grad=True)
    both = aug.apply(torch.cat([real, syn]), drawn)
    assert torch.allclose(both, torch.cat([aug.apply(real, drawn), aug.apply(syn, drawn)]), atol=1e-6)
    aug.apply(syn, drawn).pow(2).sum().backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0
    # single mode: one family per draw, each family drawn over many iterations; the same generator state, the same draw
    single = augment()
    seen = {single.draw(gen, 8, 8)[0][0] for _ in range(200)}
    assert seen == set(FAMILIES)
    assert single.draw(torch.Generator().manual_seed(1), 8, 8) == single.draw(torch.Generator().manual_seed(1), 8, 8)


def test_the_drawn_ranges_are_dsas():
    aug = augment(mode="all")
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        p = dict(aug.draw(gen, 32, 32))
        assert -4 <= p["crop"]["dx"] <= 4 and -4 <= p["crop"]["dy"] <= 4  # round(32 / 8)
        assert 1 / 1.2 <= p["scale"]["sx"] <= 1.2 and abs(p["rotate"]["angle"]) <= math.radians(15)


@pytest.mark.parametrize("changes, says", [({"strategy": "color_jitter"}, "unknown: \\['jitter'\\]"),
                                           ({"strategy": ""}, "families joined by"),
                                           ({"ratio_scale": 0.8}, "ratio_scale")])
def test_settings_name_what_is_wrong(changes, says):
    with pytest.raises(MmddError, match=says):
        DSASettings(**{**STANDARD, **changes})
