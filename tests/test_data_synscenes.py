import json
import os

import numpy as np
import pytest
from PIL import Image

from mmdd.data.synscenes import COLORS, SynScenesConfig, generate_synscenes, load_synscenes

SMALL = dict(num_train=12, num_val=4, num_test=6)


def read_tree(root):
    anns = {s: (root / "annotations" / f"synscenes_{s}.json").read_text() for s in ("train", "val", "test")}
    imgs = {p.name: np.asarray(Image.open(p)) for p in sorted((root / "images").rglob("*.png"))}
    return anns, imgs


def test_deterministic_by_seed(tmp_path):
    a = generate_synscenes(SynScenesConfig(root=str(tmp_path / "a"), seed=3, **SMALL))
    b = generate_synscenes(SynScenesConfig(root=str(tmp_path / "b"), seed=3, **SMALL))
    c = generate_synscenes(SynScenesConfig(root=str(tmp_path / "c"), seed=4, **SMALL))
    anns_a, imgs_a = read_tree(a)
    anns_b, imgs_b = read_tree(b)
    anns_c, imgs_c = read_tree(c)
    assert anns_a == anns_b
    assert all(np.array_equal(imgs_a[k], imgs_b[k]) for k in imgs_a)
    assert anns_a != anns_c
    assert any(not np.array_equal(imgs_a[k], imgs_c[k]) for k in imgs_a)


def test_format_and_counts(tmp_path):
    root = generate_synscenes(SynScenesConfig(root=str(tmp_path / "d"), image_size=64, **SMALL))
    train = json.loads((root / "annotations" / "synscenes_train.json").read_text())
    assert len(train) == 12 * 5 and all(isinstance(e["caption"], str) and "image_id" in e for e in train)
    test = json.loads((root / "annotations" / "synscenes_test.json").read_text())
    assert len(test) == 6 and all(len(e["caption"]) == 5 for e in test)
    img = Image.open(root / test[0]["image"])
    assert img.size == (64, 64) and img.mode == "RGB"
    split = load_synscenes(root, "test")  # through the BLIP loader
    assert split.num_images == 6 and split.num_captions == 30
    assert all(len(c.split()) <= 30 for c in split.captions)


def test_captions_are_varied_and_describe_the_scene(tmp_path):
    root = generate_synscenes(SynScenesConfig(root=str(tmp_path / "e"), num_train=40, num_val=2, num_test=2))
    split = load_synscenes(root, "train")
    scenes = json.loads((root / "scenes_train.json").read_text())
    distinct = [len(set(split.captions[t] for t in ts)) for ts in split.img2txt()]
    assert sum(distinct) / len(distinct) >= 3.5
    text = " ".join(split.captions)
    for word in ("left of", "above", "background", "two"):
        assert word in text or word.replace(" of", "") in text
    # most captions mention a colour of one of the image's objects
    hits = 0
    for i, ts in enumerate(split.img2txt()):
        colors = {o["color"] for o in scenes[i]["objects"]}
        hits += sum(any(c in split.captions[t] for c in colors) for t in ts)
    assert hits / len(split.captions) > 0.7
    assert all(any(c in COLORS for c in [o["color"]]) for s in scenes for o in s["objects"])


def test_cached_on_second_call_and_regenerated_on_change(tmp_path):
    cfg = SynScenesConfig(root=str(tmp_path / "f"), **SMALL)
    root = generate_synscenes(cfg)
    meta = root / "meta.json"
    mtime = meta.stat().st_mtime_ns
    generate_synscenes(cfg)
    assert meta.stat().st_mtime_ns == mtime
    generate_synscenes(SynScenesConfig(root=str(tmp_path / "f"), **{**SMALL, "num_test": 3}))
    assert len(json.loads((root / "annotations" / "synscenes_test.json").read_text())) == 3
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_bad_size_rejected():
    with pytest.raises(ValueError, match="image_size"):
        SynScenesConfig(root="x", image_size=512)
