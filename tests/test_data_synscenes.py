import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdd.data.synscenes import COLORS, SynScenesConfig, _relation, generate_synscenes, load_synscenes
from mmdd.errors import DataError

SRC = Path(__file__).resolve().parents[1] / "src"

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


def test_bad_config_rejected():
    with pytest.raises(DataError, match="image_size"):
        SynScenesConfig(root="x", image_size=512)
    with pytest.raises(DataError, match="supersample"):
        SynScenesConfig(root="x", supersample=0)
    with pytest.raises(DataError, match="num_val"):
        SynScenesConfig(root="x", num_val=0)
    with pytest.raises(DataError, match="seed must be an integer"):
        SynScenesConfig(root="x", seed="abc")


def test_cache_regenerates_when_files_are_missing(tmp_path):
    cfg = SynScenesConfig(root=str(tmp_path / "g"), **SMALL)
    root = generate_synscenes(cfg)
    (root / "images" / "val" / "val_00001.png").unlink()
    generate_synscenes(cfg)
    assert (root / "images" / "val" / "val_00001.png").is_file()
    mtime = (root / "meta.json").stat().st_mtime_ns
    generate_synscenes(cfg, overwrite=True)
    assert (root / "meta.json").stat().st_mtime_ns != mtime


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    foreign = tmp_path / "mydata"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a synscenes dataset"):
        generate_synscenes(SynScenesConfig(root=str(foreign), **SMALL))
    assert (foreign / "precious.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_synscenes(SynScenesConfig(root=str(empty), **SMALL)) / "meta.json").is_file()


def test_meta_and_scenes(tmp_path):
    root = generate_synscenes(SynScenesConfig(root=str(tmp_path / "m"), **SMALL))
    meta = json.loads((root / "meta.json").read_text())
    assert meta["name"] == "synscenes" and meta["config"]["num_train"] == 12 and len(meta["fingerprint"]) == 16
    assert "root" not in meta["config"]  # the same data under another directory is the same data
    other = generate_synscenes(SynScenesConfig(root=str(tmp_path / "m2"), **SMALL))
    assert json.loads((other / "meta.json").read_text())["fingerprint"] == meta["fingerprint"]
    scenes = json.loads((root / "scenes_val.json").read_text())
    assert len(scenes) == 4 and scenes[0]["image"] == "images/val/val_00000.png"
    for sc in scenes:
        assert 1 <= len(sc["objects"]) <= 3
        cells = [(o["row"], o["col"]) for o in sc["objects"]]
        assert len(set(cells)) == len(cells)
        assert all(o["color"] != sc["background"]["color"] for o in sc["objects"])


def test_objects_are_drawn_where_the_scene_says(tmp_path):
    root = generate_synscenes(SynScenesConfig(root=str(tmp_path / "p"), num_train=60, num_val=1, num_test=1))
    scenes = json.loads((root / "scenes_train.json").read_text())
    checked = ok = 0
    for sc in scenes:
        img = np.asarray(Image.open(root / sc["image"]), dtype=float)
        for o in sc["objects"]:
            if o["shape"] == "ring":  # hollow centre
                continue
            x = int(((o["col"] + 0.5) / 3 + o["jitter"][0]) * 32)
            y = int(((o["row"] + 0.5) / 3 + o["jitter"][1]) * 32)
            checked += 1
            ok += np.linalg.norm(img[y, x] - np.array(COLORS[o["color"]])) < 60
    assert checked > 50 and ok / checked > 0.9  # (a later object may cover an earlier one)


def test_relations_follow_the_grid():
    a = {"row": 0, "col": 0}
    b = {"row": 2, "col": 1}
    assert set(_relation(a, b)) == {"to the left of", "left of", "above", "over"}
    assert set(_relation(b, a)) == {"to the right of", "right of", "below", "under"}


def test_cli_same_output_under_any_hash_seed(tmp_path):
    """`python -m mmdd.data.synscenes` works, and no set/dict ordering leaks into the data."""
    texts = []
    for hs in ("1", "2"):
        root = tmp_path / f"cli{hs}"
        env = {**os.environ, "PYTHONHASHSEED": hs, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(
            [sys.executable, "-m", "mmdd.data.synscenes", "--root", str(root), "--num-train", "30", "--num-val", "2",
             "--num-test", "3", "--image-size", "16"],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert str(root) in proc.stdout
        texts.append([(root / "annotations" / f"synscenes_{s}.json").read_text() for s in ("train", "val", "test")])
        assert Image.open(root / "images" / "test" / "test_00002.png").size == (16, 16)
    assert texts[0] == texts[1]
    proc = subprocess.run([sys.executable, "-m", "mmdd.data.synscenes", "--root", str(tmp_path / "x"), "--image-size", "999"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "image_size" in proc.stderr and "Traceback" not in proc.stderr
