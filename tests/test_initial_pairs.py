"""How a learned method's initial pairs are drawn: mmdd's `init: real` and the reference scripts' `init: reference`."""

import torch

from mmdd.data.annotations import Split
from mmdd.data.splits import SplitData
from mmdd.data.randaugment import RandAugment
from mmdd.data.transforms import AugmentConfig, normalize
from mmdd.methods.base import reference_pairs, sample_real_pairs

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def split_data(n_images=4, per_image=5, size=8):
    g = torch.Generator().manual_seed(0)
    split = Split("train", [f"img{i}.png" for i in range(n_images)],
                  [f"caption {t}" for t in range(n_images * per_image)],
                  [t // per_image for t in range(n_images * per_image)])
    images = torch.randint(0, 256, (n_images, 3, size, size), generator=g, dtype=torch.uint8)
    text = torch.arange(n_images * per_image, dtype=torch.float32)[:, None].repeat(1, 3)  # caption t's embedding = t
    return SplitData(split, text, size, images=images, resize="squash",
                     original_sizes=torch.tensor([[size, size]] * n_images), mean=MEAN, std=STD)


def test_reference_init_draws_caption_entries_so_an_image_can_come_twice():
    data = split_data()
    off = AugmentConfig(enabled=False)
    seen_twice = False
    for seed in range(20):
        images, texts = reference_pairs(data, 4, torch.Generator().manual_seed(seed), off)
        caps = texts[:, 0].long()
        assert caps.unique().numel() == 4  # distinct caption entries
        img = caps // 5
        seen_twice |= img.unique().numel() < 4
        # each image is its caption's (no augmentation here: the decoded pixels, normalised)
        assert torch.equal(images, normalize(data.images[img], MEAN, STD))
    assert seen_twice  # 4 of 20 captions over 4 images: some draw repeats an image (mmdd's `real` never does)
    for seed in range(20):
        _, texts = sample_real_pairs(data, 4, torch.Generator().manual_seed(seed))
        assert (texts[:, 0].long() // 5).unique().numel() == 4


def test_reference_init_augments_with_the_teachers_transform():
    data = split_data(size=16)
    blip = AugmentConfig(enabled=True, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), hflip=True, style="blip",
                         crop_from="decoded", randaugment=RandAugment(num_ops=2, magnitude=5))
    a, ta = reference_pairs(data, 3, torch.Generator().manual_seed(1), blip)
    b, tb = reference_pairs(data, 3, torch.Generator().manual_seed(1), blip)
    assert torch.equal(a, b) and torch.equal(ta, tb)  # reproducible from the generator
    plain = normalize(data.images[(ta[:, 0].long() // 5)], MEAN, STD)
    assert a.shape == plain.shape and not torch.allclose(a, plain)  # cropped/flipped/RandAugmented, not the decoded
    mmdd_style = AugmentConfig(enabled=True, scale=(0.5, 0.6))
    c, tc = reference_pairs(data, 3, torch.Generator().manual_seed(1), mmdd_style)
    assert not torch.allclose(c, normalize(data.images[(tc[:, 0].long() // 5)], MEAN, STD))
