"""The reference teachers' augmentation (data.augment.style=blip) and the decode-once image cache.

RandAugment's operations are compared with the primitives BLIP's RandomAugment calls (OpenCV warpAffine/filter2D,
lookup tables) and with Pillow's ImageOps; the crop with torchvision's RandomResizedCrop under the same seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from mmdd.data import randaugment as ra
from mmdd.data.image_cache import decoded_images
from mmdd.data.sample_augment import PerImageAugment, crop_box
from mmdd.errors import DataError

GREY = (128, 128, 128)
RATIO = (0.75, 1.3333333333333333)


def natural_image(h=64, w=80, seed=0) -> np.ndarray:
    """Gradients plus noise: every value range and plenty of edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 3) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.float32)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# ------------------------------------------------------------------ RandAugment's operations, one by one
@pytest.mark.parametrize("name,matrix", [
    ("shear_x", [[1, 0.15, 0], [0, 1, 0]]), ("shear_x", [[1, -0.15, 0], [0, 1, 0]]),
    ("shear_y", [[1, 0, 0], [0.15, 1, 0]]), ("translate_x", [[1, 0, -5.0], [0, 1, 0]]),
    ("translate_x", [[1, 0, 2.5], [0, 1, 0]]), ("translate_y", [[1, 0, 0], [0, 1, -5.0]]),
])
def test_geometric_operations_match_opencv_warp_affine(name, matrix):
    img = natural_image()
    h, w = img.shape[:2]
    ref = cv2.warpAffine(img, np.float32(matrix), (w, h), borderValue=GREY, flags=cv2.INTER_LINEAR)
    arg = matrix[0][1] or matrix[1][0] if name.startswith("shear") else -(matrix[0][2] or matrix[1][2])
    got = hwc(getattr(ra, name)(chw(img), arg))
    # OpenCV interpolates in fixed point (1/32 pixel): at most one grey level apart
    assert max_diff(got, ref) <= 1
    if name.startswith("translate") and float(arg).is_integer():
        assert np.array_equal(got, ref)  # whole-pixel shifts are exact, grey border included


@pytest.mark.parametrize("degrees", [15.0, -15.0, 90.0])
def test_rotate_matches_opencv_rotation_about_w2_h2(degrees):
    img = natural_image()
    h, w = img.shape[:2]
    ref = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1), (w, h), borderValue=GREY)
    assert max_diff(hwc(ra.rotate(chw(img), degrees)), ref) <= 1


def test_rotate_by_90_degrees_moves_pixels_where_hand_computed():
    # About (W/2, H/2) = (2, 2) on a 4x4 image, counter-clockwise: output (x, y) takes input (4 - y, x)... for
    # x' = (x - 2), y' = (y - 2): input = (2 - y', 2 + x') = (4 - y, x). Input column 4 is outside: grey.
    img = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    out = hwc(ra.rotate(chw(img), 90.0))
    for y in range(4):
        for x in range(4):
            sx, sy = 4 - y, x
            want = img[sy, sx] if 0 <= sx < 4 else np.array(GREY)
            assert np.array_equal(out[y, x], want), (x, y)


def test_autocontrast_and_equalize_match_pillow():
    img = natural_image()
    pil = Image.fromarray(img)
    assert np.array_equal(hwc(ra.autocontrast(chw(img))), np.asarray(ImageOps.autocontrast(pil)))
    assert np.array_equal(hwc(ra.equalize(chw(img))), np.asarray(ImageOps.equalize(pil)))
    flat = np.full((8, 8, 3), 77, np.uint8)  # one value per channel: both leave it alone
    assert np.array_equal(hwc(ra.autocontrast(chw(flat))), flat)
    assert np.array_equal(hwc(ra.equalize(chw(flat))), flat)


def test_autocontrast_of_a_bright_channel_is_pillows_not_the_int8_wraparound():
    # Every value 150..200: the reference's np.int8(150) = -106 would push the channel to 255; Pillow stretches it.
    img = np.random.default_rng(1).integers(150, 201, (16, 16, 3)).astype(np.uint8)
    got = hwc(ra.autocontrast(chw(img)))
    assert np.array_equal(got, np.asarray(ImageOps.autocontrast(Image.fromarray(img))))
    assert got.min() == 0 and got.max() >= 254  # stretched over the range (the table truncates, as Pillow)


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.0, 1.9])
def test_sharpness_and_brightness_match_the_reference_formulas(factor):
    img = natural_image()
    kernel = np.ones((3, 3), np.float32)
    kernel[1, 1] = 5
    smooth = cv2.filter2D(img, -1, kernel / 13)
    if factor == 0.0:
        ref = smooth
    else:
        ref = img.astype(np.float32)
        inner = smooth[1:-1, 1:-1].astype(np.float32)
        ref[1:-1, 1:-1] = inner + factor * (ref[1:-1, 1:-1] - inner)
        ref = np.clip(ref, 0, 255).astype(np.uint8)
    assert np.array_equal(hwc(ra.sharpness(chw(img), factor)), ref)
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    assert np.array_equal(hwc(ra.brightness(chw(img), factor)), table[img])


def test_magnitude_5_enhancements_are_the_identity_as_in_the_reference():
    img = chw(natural_image())
    assert ra.enhance_factor(5) == pytest.approx(1.0)
    for op in ("Brightness", "Sharpness", "Identity"):
        assert torch.equal(ra.RandAugment(num_ops=1, magnitude=5, ops=(op,))(img), img)


def test_each_drawn_operation_applies_half_the_time_with_either_sign():
    img = chw(natural_image())
    aug = ra.RandAugment(num_ops=1, magnitude=5, ops=("TranslateX",))
    g = torch.Generator().manual_seed(0)
    left = right = same = 0
    for _ in range(400):
        out = aug(img, g)
        if torch.equal(out, img):
            same += 1
        elif torch.equal(out, ra.translate_x(img, 5.0)):
            right += 1
        else:
            assert torch.equal(out, ra.translate_x(img, -5.0))
            left += 1
    assert 160 < same < 240 and 60 < left < 140 and 60 < right < 140, (same, left, right)


def test_unknown_operation_is_refused_with_the_choices():
    with pytest.raises(DataError, match=r"randaugment.ops: unknown operation\(s\) \['Solarise'\]; choose from"):
        ra.RandAugment(ops=("Rotate", "Solarise"))


# ------------------------------------------------------------------ the crop, against torchvision
def test_crop_boxes_are_torchvisions_under_the_same_seed():
    for k in range(300):
        w, h = [(500, 375), (375, 500), (640, 480), (60, 1000), (224, 224)][k % 5]  # (60, 1000): the fallback
        torch.manual_seed(k)
        top, left, ch, cw = T.RandomResizedCrop.get_params(torch.zeros(1, h, w), [0.5, 1.0], list(RATIO))
        torch.manual_seed(k)
        assert crop_box(w, h, (0.5, 1.0), RATIO) == (left, top, cw, ch), (k, w, h)


def augmenter(crop_from: str, size=224, randaugment=None) -> PerImageAugment:
    return PerImageAugment(size=size, scale=(0.5, 1.0), ratio=RATIO, hflip=True,
                           randaugment=randaugment or ra.RandAugment(num_ops=0), crop_from=crop_from, resize="squash")


def test_crop_from_original_is_torchvisions_pipeline_pixel_for_pixel(tmp_path):
    path = tmp_path / "a.jpg"
    Image.fromarray(natural_image(375, 500)).save(path)
    reference = T.Compose([T.RandomResizedCrop(224, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
                           T.RandomHorizontalFlip()])
    aug = augmenter("original")
    for seed in range(8):
        torch.manual_seed(seed)
        want = np.asarray(reference(Image.open(path).convert("RGB")))
        torch.manual_seed(seed)
        assert np.array_equal(hwc(aug.finish(aug.crop_original(path))), want), seed


def test_crop_from_decoded_cuts_the_same_region_from_the_decoded_pixels(tmp_path):
    # A smooth 400x300 picture decoded (squashed) to 96 px: the crop cut from the 96 px pixels shows the same
    # region as the crop of the file, only softer.
    yy, xx = np.mgrid[0:300, 0:400]
    img = np.stack([xx * 255 // 399, yy * 255 // 299, (xx + yy) * 255 // 698], -1).astype(np.uint8)
    decoded = chw(np.asarray(Image.fromarray(img).resize((96, 96), Image.Resampling.BICUBIC)))
    path = tmp_path / "g.png"
    Image.fromarray(img).save(path)
    aug = augmenter("decoded", size=64)
    for seed in range(10):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        a = aug.crop_decoded(decoded, (400, 300), g1).float()
        b = augmenter("original", size=64).crop_original(path, g2).float()
        assert (a - b).abs().mean() < 1.5, seed


# ------------------------------------------------------------------ the decode-once cache
def write_images(folder: Path, sizes) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"{i}.jpg"
        Image.fromarray(natural_image(h, w, seed=i)).save(p, quality=95)
        paths.append(p)
    return paths


def test_images_are_decoded_once_and_reused(tmp_path, monkeypatch):
    from mmdd.data import image_cache
    from mmdd.data.images import load_images_tensor

    paths = write_images(tmp_path / "img", [(50, 40), (30, 60), (32, 32)])
    cache = tmp_path / "cache"
    first = decoded_images(paths, 24, "squash", cache, num_workers=2)
    assert first.pixels.shape == (3, 3, 24, 24) and first.pixels.dtype == np.uint8
    assert first.original_sizes.tolist() == [[50, 40], [30, 60], [32, 32]]
    assert np.array_equal(np.asarray(first.pixels), load_images_tensor(paths, 24, resize="squash").numpy())
    assert isinstance(first.pixels, np.memmap)

    def no_decoding(path):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_cache, "load_image", no_decoding)
    again = decoded_images(paths, 24, "squash", cache)
    assert again.folder == first.folder and np.array_equal(np.asarray(again.pixels), np.asarray(first.pixels))
    monkeypatch.undo()
    # A changed file, size or resize rule is another cache
    os.utime(paths[1], ns=(paths[1].stat().st_atime_ns, paths[1].stat().st_mtime_ns + 10**9))
    assert decoded_images(paths, 24, "squash", cache).folder != first.folder
    assert decoded_images(paths, 16, "squash", cache).folder != first.folder
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 3


def test_every_bad_image_is_reported_at_once_with_its_entry_and_nothing_is_left(tmp_path):
    paths = write_images(tmp_path / "img", [(20, 20)] * 4)
    paths[1].write_bytes(b"")  # empty
    paths[3].write_bytes(paths[3].read_bytes()[:100])  # truncated
    sources = [f"train.jsonl: line {i + 1}" for i in range(4)]
    with pytest.raises(DataError) as err:
        decoded_images(paths, 16, "squash", tmp_path / "cache", sources=sources, name="mine/train")
    msg = str(err.value)
    assert msg.startswith("2 of the 4 images of mine/train cannot be used:")
    assert "train.jsonl: line 2: image file" in msg and "train.jsonl: line 4: image file" in msg
    assert "line 1" not in msg and "line 3" not in msg
    assert list((tmp_path / "cache").iterdir()) == []  # no half-built cache


def test_split_loaded_through_the_cache_feeds_the_per_image_teacher_transform(tmp_path):
    from hydra import compose, initialize_config_dir

    from mmdd.data.splits import PairDataset, load_data
    from mmdd.data.transforms import augment_config, per_image_augment
    from mmdd.paths import conf_dir

    root = tmp_path / "mine"
    paths = write_images(root / "imgs", [(60, 40), (40, 60), (50, 50), (80, 30)])
    rows = [{"image": f"imgs/{p.name}", "caption": f"picture number {i}"} for i, p in enumerate(paths)]
    for split in ("train", "val", "test"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("buffer", overrides=[f"paths.root_dir={tmp_path}", "data=pairs_table", f"data.root={root}",
                                           "data.image_size=32", "data.resize=squash"])
    assert cfg.data.decode_cache and cfg.data.augment.style == "blip"
    train = load_data(cfg, splits=("train",))["train"]
    assert train.original_sizes.tolist() == [[60, 40], [40, 60], [50, 50], [80, 30]]
    aug = augment_config(cfg.data.augment)
    assert aug.randaugment.num_ops == 2 and aug.randaugment.magnitude == 5
    dataset = PairDataset(train, unit="caption", augment=per_image_augment(aug, train))
    torch.manual_seed(0)
    image, text, index = dataset[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and index == 3
    # The decoded pixels and the transform's source agree: with no randomness left, the crop is the whole image
    whole = PerImageAugment(size=32, scale=(1.0, 1.0), ratio=(80 / 30, 80 / 30), hflip=False,
                            randaugment=ra.RandAugment(num_ops=0), crop_from="decoded", resize="squash")
    assert max_diff(hwc(whole(train, 3)), hwc(train.image(3))) <= 1
    # crop_from=decoded needs decoded pixels
    train.images = None
    with pytest.raises(DataError, match="data.augment.crop_from=decoded crops the decoded images"):
        per_image_augment(aug, train)
