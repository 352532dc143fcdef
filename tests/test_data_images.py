import numpy as np
import pytest
import torch
from PIL import Image

from mmdd.data.images import load_image, load_images_tensor
from mmdd.errors import DataError


def test_odd_modes_load_as_rgb(tmp_path):
    gray = tmp_path / "g.png"
    Image.new("L", (4, 4), 100).save(gray)
    assert load_image(gray).mode == "RGB"
    assert np.asarray(load_image(gray))[0, 0].tolist() == [100, 100, 100]

    rgba = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(rgba)  # fully transparent red -> white
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]

    deep = tmp_path / "d.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(deep)  # 16-bit, half range
    v = np.asarray(load_image(deep))[0, 0]
    assert 120 <= v[0] <= 135 and v[0] == v[1] == v[2]  # scaled, not clipped to 255

    pal = tmp_path / "p.png"
    Image.new("RGB", (4, 4), (0, 0, 255)).convert("P").save(pal)
    assert np.asarray(load_image(pal))[0, 0].tolist() == [0, 0, 255]


def test_missing_and_corrupt_images_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope.png does not exist"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=r"bad.png could not be decoded .*truncated or corrupt"):
        load_image(bad)


def test_tensor_loading_resizes_and_crops(tmp_path):
    p = tmp_path / "wide.png"
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, 10:30] = 255  # white centre band, black sides
    Image.fromarray(arr).save(p)
    t = load_images_tensor([p], 10)
    assert t.shape == (1, 3, 10, 10) and t.dtype.is_floating_point is False
    assert t[0, :, 5, 5].tolist() == [255, 255, 255]  # centre crop keeps the band


def test_more_modes(tmp_path):
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk, quality=100)  # pure red in CMYK
    r, g, b = np.asarray(load_image(cmyk))[4, 4].tolist()
    assert r > 200 and g < 50 and b < 50

    la = tmp_path / "la.png"
    Image.new("LA", (4, 4), (0, 128)).save(la)  # half-transparent black on white -> mid gray
    v = np.asarray(load_image(la))[0, 0]
    assert 120 <= v[0] <= 135 and v[0] == v[1] == v[2]

    opaque = tmp_path / "o.png"
    Image.new("RGBA", (4, 4), (10, 200, 30, 255)).save(opaque)
    assert np.asarray(load_image(opaque))[0, 0].tolist() == [10, 200, 30]

    bilevel = tmp_path / "b.png"
    Image.new("1", (4, 4), 1).save(bilevel)
    assert np.asarray(load_image(bilevel))[0, 0].tolist() == [255, 255, 255]

    # 32-bit integer and float images (TIFF): values scaled to 8 bit, not clipped
    i32 = tmp_path / "i.tif"
    Image.fromarray(np.full((4, 4), 65535, dtype=np.int32), mode="I").save(i32)
    assert np.asarray(load_image(i32))[0, 0].tolist() == [255, 255, 255]
    f32 = tmp_path / "f.tif"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F").save(f32)
    assert 125 <= np.asarray(load_image(f32))[0, 0, 0] <= 130


def test_16bit_gradient_keeps_its_range(tmp_path):
    deep = tmp_path / "grad16.png"
    Image.fromarray(np.linspace(0, 65535, 16, dtype=np.uint16).reshape(4, 4)).save(deep)
    v = np.asarray(load_image(deep))[..., 0].ravel()
    assert v[0] == 0 and v[-1] == 255 and np.all(np.diff(v.astype(int)) > 0)


def test_truncated_png_and_directory(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:400])
    with pytest.raises(DataError, match=r"cut.png could not be decoded .*truncated or corrupt"):
        load_image(cut)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError, match=r"dir.png is not a file"):
        load_image(tmp_path / "dir.png")


def test_tensor_loading_threaded_matches_sequential_and_reports_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(70):
        p = tmp_path / f"{i}.png"
        h, w = (12, 20) if i % 2 else (16, 16)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    a = load_images_tensor(paths, 8, num_workers=1)
    b = load_images_tensor(paths, 8, num_workers=4)
    assert a.shape == (70, 3, 8, 8) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert load_images_tensor([], 8).shape == (0, 3, 8, 8)
    (tmp_path / "50.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"50.png could not be decoded"):
        load_images_tensor(paths, 8, num_workers=4)


def test_squash_keeps_the_whole_image_as_the_reference_evaluation(tmp_path):
    """data.resize=squash (Flickr/COCO): Resize((S, S)) bicubic, as torchvision's on a PIL image; center_crop cuts
    the sides of a wide image."""
    import numpy as np
    from PIL import Image

    from mmdd.data.images import load_images_tensor

    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, :10] = (255, 0, 0)  # a red strip at the left edge
    wide[:, 10:] = (0, 0, 255)
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    squashed = load_images_tensor([path], 16, resize="squash")[0]
    cropped = load_images_tensor([path], 16, resize="center_crop")[0]
    want = np.asarray(Image.fromarray(wide).resize((16, 16), Image.Resampling.BICUBIC))
    assert torch.equal(squashed, torch.from_numpy(want.copy()).permute(2, 0, 1))
    assert squashed[0, :, 0].float().mean() > 200  # the red strip survives
    assert cropped[0].float().max() < 50  # centre crop: only blue is left
