import numpy as np
import pytest
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
