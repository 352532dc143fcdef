"""The reference teachers' augmentation, image by image: RandomResizedCrop in the original image's geometry
(bicubic), horizontal flip, BLIP's RandomAugment (`data.augment.style: blip`).

MTT-VL, LoRS and RepBlend train their experts with torchvision's RandomResizedCrop(size, scale=(0.5, 1),
interpolation=BICUBIC) on the decoded file, RandomHorizontalFlip and RandomAugment(2, 5, BLIP's ten operations).
Where the crop's pixels come from is `data.augment.crop_from`:
- `original`: the file is decoded for every example and cropped with Pillow, exactly as the reference (and at its
  cost: one JPEG decode per caption per epoch);
- `decoded`: the crop box is drawn in the original's geometry (its width and height are recorded when it is
  decoded) and cut from the split's decoded `data.image_size` pixels (the decode-once cache), resampled with the
  same bicubic filter. Same boxes, same aspect ratios; the source has fewer pixels, so crops of a large original are
  softer than the reference's (experiments/paper_settings.md gives the measured difference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmdd.data.images import load_image
from mmdd.data.randaugment import RandAugment

_BICUBIC = Image.Resampling.BICUBIC


def crop_box(width: int, height: int, scale, ratio, generator: torch.Generator | None = None):
    """(left, top, w, h) of a random crop covering `scale` of the area with aspect ratio in `ratio` (log-uniform):
    torchvision's RandomResizedCrop.get_params - ten tries, then the largest centred crop within `ratio`."""
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision, so the same draws give the same boxes
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
        aspect = float(torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                                         generator=generator)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


@dataclass
class PerImageAugment:
    """Crop, flip and RandAugment one training image; returns uint8 [3, size, size]."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: bool
    randaugment: RandAugment
    crop_from: str = "decoded"  # or "original"
    resize: str = "squash"  # how the decoded pixels were made from the file (mmdd.data.images.resize_image)

    def crop_original(self, path, generator=None) -> torch.Tensor:
        img = load_image(path)
        left, top, w, h = crop_box(img.width, img.height, self.scale, self.ratio, generator)
        return _to_tensor(img.crop((left, top, left + w, top + h)).resize((self.size, self.size), _BICUBIC))

    def crop_decoded(self, pixels: torch.Tensor, original_size, generator=None) -> torch.Tensor:
        side = pixels.shape[-1]
        if self.resize == "squash":
            width, height = (int(v) for v in original_size)
        else:  # centre-cropped on decoding: only the centre square is there, so crops are drawn inside it
            width = height = side
        left, top, w, h = crop_box(width, height, self.scale, self.ratio, generator)
        sx, sy = side / width, side / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)  # the same region, in decoded pixels
        img = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        return _to_tensor(img.resize((self.size, self.size), _BICUBIC, box=box))

    def finish(self, img: torch.Tensor, generator=None) -> torch.Tensor:
        if self.hflip and float(torch.rand((), generator=generator)) < 0.5:
            img = img.flip(-1)
        return self.randaugment(img, generator)

    def __call__(self, data, i: int, generator=None) -> torch.Tensor:
        """Image `i` of the split `data` (a SplitData), augmented."""
        if self.crop_from == "original":
            img = self.crop_original(data.split.image_paths[i], generator)
        else:
            img = self.crop_decoded(data.image(i), data.original_size(i), generator)
        return self.finish(img, generator)
