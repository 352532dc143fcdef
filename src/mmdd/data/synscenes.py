"""synscenes: the embedded procedural image-caption dataset (the default dataset).

Scenes of 1-3 coloured shapes on a patterned background, drawn supersampled and downscaled,
each with five captions written like human ones (templates, synonyms, spatial relations,
counts, partial descriptions). Written to disk in the BLIP/ALBEF annotation format plus PNGs,
so it is read back through the same loader as Flickr30K. Deterministic by seed: every image
has its own `random.Random` seeded from the string (seed, split, index) (string seeds are
hashed with SHA-512, so this is stable across processes and Python versions; no global RNG).

Layout under `root`:
  images/{split}/{split}_{idx:05d}.png
  annotations/synscenes_train.json   one entry per caption {"image", "caption", "image_id"}
  annotations/synscenes_{val,test}.json   one entry per image {"image", "caption": [...]}
  scenes_{split}.json   ground-truth scene per image (background, objects with grid cells)
  meta.json   config, format version and a content fingerprint
Image paths in the annotations are relative to `root` ("images/train/train_00000.png"), so
`image_root` = `root`. Generation writes into `root.tmp-<pid>` and renames it into place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mmdd.data.annotations import Split, load_blip_split
from mmdd.errors import DataError
from mmdd.utils.io import process_alive

FORMAT_VERSION = 3

COLORS = {
    "red": (220, 30, 35),
    "green": (40, 175, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 225, 35),
    "orange": (250, 135, 20),
    "purple": (135, 45, 185),
    "pink": (250, 130, 200),
    "white": (248, 248, 248),
    "black": (12, 12, 12),
    "cyan": (40, 215, 225),
    "brown": (125, 75, 30),
}
# Backgrounds are muted versions of a few colours, so objects stand out from them.
BACKGROUNDS = {
    "gray": (120, 120, 120),
    "blue": (70, 90, 140),
    "green": (80, 125, 85),
    "brown": (130, 105, 80),
    "purple": (110, 85, 130),
    "beige": (200, 185, 150),
}
# An object colour is only used on a background when it differs clearly from both background
# tones (Euclidean RGB distance), so no "brown star on a brown background" is invisible.
MIN_CONTRAST = 95.0
PATTERNS = ("plain", "stripes", "checker", "dots", "gradient")
PATTERN_WORDS = {
    "plain": ["plain", "solid", "uniform"],
    "stripes": ["striped"],
    "checker": ["checkered", "checkerboard"],
    "dots": ["dotted", "polka dot"],
    "gradient": ["gradient", "shaded"],
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
SHAPE_WORDS = {
    "circle": ["circle", "disc"],
    "square": ["square", "box"],
    "triangle": ["triangle"],
    "star": ["star"],
    "cross": ["cross", "plus sign"],
    "ring": ["ring", "donut"],
    "diamond": ["diamond", "rhombus"],
    "hexagon": ["hexagon"],
}
SIZES = {"small": 0.085, "medium": 0.12, "large": 0.155}  # radius as a fraction of the side
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["medium", "medium-sized"], "large": ["large", "big"]}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass
class SynScenesConfig:
    root: str
    image_size: int = 32
    supersample: int = 4
    num_train: int = 5000
    num_val: int = 500
    num_test: int = 1000
    captions_per_image: int = 5
    seed: int = 0

    def __post_init__(self):
        for f in ("image_size", "supersample", "num_train", "num_val", "num_test", "captions_per_image", "seed"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int):
                try:
                    ok = float(v) == int(v)
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise DataError(f"data.generate.{f} must be an integer, got {v!r}")
                setattr(self, f, int(v))
        if not 8 <= self.image_size <= 224:
            raise DataError(f"data.generate.image_size (synscenes image_size) must be within 8..224, got {self.image_size}")
        if not 1 <= self.supersample <= 8:
            raise DataError(f"data.generate.supersample must be within 1..8, got {self.supersample}")
        for f in ("num_train", "num_val", "num_test"):
            if not 1 <= getattr(self, f) <= 99999:
                raise DataError(f"data.generate.{f} must be within 1..99999, got {getattr(self, f)}")
        if not 1 <= self.captions_per_image <= 20:
            raise DataError(f"data.generate.captions_per_image must be within 1..20, got {self.captions_per_image}")


# ----------------------------------------------------------------------------- scenes
def _shade(rgb, f):
    return tuple(int(max(0, min(255, c * f))) for c in rgb)


def _background_tones(name: str) -> tuple[tuple, tuple]:
    base = BACKGROUNDS[name]
    return base, _shade(base, 0.7 if sum(base) > 400 else 1.35)


def object_colors_for(background: str) -> list[str]:
    """Object colours that stand out from `background` (both of its tones)."""
    tones = _background_tones(background)
    return [
        name for name, rgb in COLORS.items()
        if name != background and min(math.dist(rgb, t) for t in tones) >= MIN_CONTRAST
    ]


def sample_scene(rng: random.Random) -> dict:
    background = {"color": rng.choice(list(BACKGROUNDS)), "pattern": rng.choice(PATTERNS)}
    palette = object_colors_for(background["color"])
    n = rng.choice((1, 2, 2, 3, 3))
    cells = rng.sample(range(9), n)
    objects = []
    for k, cell in enumerate(cells):
        if k > 0 and rng.random() < 0.3:  # repeat an earlier object's look, so counts appear
            src = objects[rng.randrange(k)]
            shape, color = src["shape"], src["color"]
        else:
            shape, color = rng.choice(SHAPES), rng.choice(palette)
        objects.append(
            {
                "shape": shape,
                "color": color,
                "size": rng.choice(list(SIZES)),
                "row": cell // 3,
                "col": cell % 3,
                "jitter": [rng.uniform(-0.035, 0.035), rng.uniform(-0.035, 0.035)],
                "angle": rng.uniform(-0.25, 0.25),
            }
        )
    return {"background": background, "objects": objects}


def _draw_background(draw: ImageDraw.ImageDraw, side: int, bg: dict) -> None:
    base, alt = _background_tones(bg["color"])
    draw.rectangle([0, 0, side, side], fill=base)
    p = bg["pattern"]
    step = side // 8
    if p == "stripes":
        for i in range(0, side, 2 * step):
            draw.rectangle([i, 0, i + step - 1, side], fill=alt)
    elif p == "checker":
        for y in range(0, side, step):
            for x in range(0, side, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=alt)
    elif p == "dots":
        r = step // 4
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=alt)
    elif p == "gradient":
        for y in range(side):
            t = y / max(side - 1, 1)
            draw.line([0, y, side, y], fill=tuple(int(a * (1 - t) + b * t) for a, b in zip(base, alt)))


def _polygon(cx, cy, r, n, angle, inner=None):
    pts = []
    total = n * 2 if inner else n
    for i in range(total):
        rad = (inner if inner and i % 2 else r)
        a = angle - math.pi / 2 + 2 * math.pi * i / total
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_object(draw: ImageDraw.ImageDraw, side: int, o: dict) -> None:
    cell = side / 3
    cx = (o["col"] + 0.5) * cell + o["jitter"][0] * side
    cy = (o["row"] + 0.5) * cell + o["jitter"][1] * side
    r = SIZES[o["size"]] * side
    fill = COLORS[o["color"]]
    a = o["angle"]
    shape = o["shape"]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        w = max(1, int(r * 0.45))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=w)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.15, 4, a + math.pi / 4), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, 0.0), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.2, 3, a), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, a), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.2, 5, a, inner=r * 0.5), fill=fill)
    elif shape == "cross":
        t = r * 0.38
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)


def render_scene(scene: dict, image_size: int, supersample: int) -> Image.Image:
    side = image_size * supersample
    img = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(img)
    _draw_background(draw, side, scene["background"])
    for o in scene["objects"]:
        _draw_object(draw, side, o)
    return img.resize((image_size, image_size), Image.LANCZOS) if supersample > 1 else img


# ----------------------------------------------------------------------------- captions
def _plural(word: str) -> str:
    if word.endswith(("x", "s")):
        return word + "es"
    if word == "plus sign":
        return "plus signs"
    return word + "s"


def _position(o: dict, rng: random.Random) -> str:
    row, col = ROWS[o["row"]], COLS[o["col"]]
    if row == "middle" and col == "center":
        return rng.choice(["in the center", "in the middle", "at the center"])
    if row == "middle":
        return rng.choice([f"on the {col}", f"on the {col} side", f"at the {col}"])
    if col == "center":
        return rng.choice([f"at the {row}", f"in the {row} middle", f"near the {row}"])
    corner = {"top": ["top", "upper"], "bottom": ["bottom", "lower"]}[row]
    return rng.choice([f"in the {corner[0]} {col}", f"in the {rng.choice(corner)} {col} corner", f"at the {row} {col}"])


def _noun(o: dict, rng: random.Random, size=True, color=True) -> str:
    words = []
    if size and rng.random() < 0.6:
        words.append(rng.choice(SIZE_WORDS[o["size"]]))
    if color:
        words.append(o["color"])
    words.append(rng.choice(SHAPE_WORDS[o["shape"]]))
    return " ".join(words)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _relation(a: dict, b: dict) -> list[str]:
    rels = []
    if a["col"] < b["col"]:
        rels += ["to the left of", "left of"]
    if a["col"] > b["col"]:
        rels += ["to the right of", "right of"]
    if a["row"] < b["row"]:
        rels += ["above", "over"]
    if a["row"] > b["row"]:
        rels += ["below", "under"]
    return rels


def _counted(objects: list[dict], rng: random.Random) -> list[str]:
    groups: dict[tuple[str, str], int] = {}
    for o in objects:
        groups[(o["color"], o["shape"])] = groups.get((o["color"], o["shape"]), 0) + 1
    out = []
    for (color, shape), n in groups.items():
        word = rng.choice(SHAPE_WORDS[shape])
        out.append(f"{NUMBERS[n]} {color} {_plural(word) if n > 1 else word}" if n > 1 or rng.random() < 0.5
                   else _article(f"{color} {word}"))
    return out


INTROS = ["a picture of", "an image showing", "there is", "this image contains", "a drawing of", "we can see", "",
          "a simple illustration with", "an image with"]


def _t_full(scene, rng):
    objs = [f"{_article(_noun(o, rng))} {_position(o, rng)}" for o in scene["objects"]]
    intro = rng.choice(INTROS)
    return f"{intro} {_join(objs)}".strip()


def _t_relation(scene, rng):
    objs = scene["objects"]
    if len(objs) < 2:
        return None
    a, b = rng.sample(objs, 2)
    rel = rng.choice(_relation(a, b))
    return f"{_article(_noun(a, rng))} {rel} {_article(_noun(b, rng))}"


def _t_count(scene, rng):
    groups = _counted(scene["objects"], rng)
    return rng.choice(["", "there are ", "the picture shows ", "an image of "]) + _join(groups) if len(
        scene["objects"]) > 1 else None


def _t_background(scene, rng):
    bg = scene["background"]
    pattern = rng.choice(PATTERN_WORDS[bg["pattern"]])
    objs = _join([_article(_noun(o, rng)) for o in scene["objects"]])
    return rng.choice([f"{objs} on a {pattern} {bg['color']} background",
                       f"a {pattern} {bg['color']} background with {objs}"])


def _t_shapes_only(scene, rng):
    counts = dict.fromkeys(o["shape"] for o in scene["objects"])  # first-seen order
    counts = {sh: sum(o["shape"] == sh for o in scene["objects"]) for sh in counts}
    parts = []
    for shape, n in counts.items():
        word = rng.choice(SHAPE_WORDS[shape])
        parts.append(f"{NUMBERS[n]} {_plural(word)}" if n > 1 else _article(word))
    return rng.choice(["some shapes:", "shapes including", "a scene with", ""]) + " " + _join(parts)


def _t_colors_only(scene, rng):
    colors = list(dict.fromkeys(o["color"] for o in scene["objects"]))  # ordered: no set-order randomness
    rng.shuffle(colors)
    return rng.choice(["something", "a few things that are", "objects colored", "shapes in"]) + " " + _join(colors)


def _t_positions(scene, rng):
    o = rng.choice(scene["objects"])
    return f"{_article(_noun(o, rng, size=False, color=rng.random() < 0.7))} {_position(o, rng)}"


TEMPLATES = [_t_full, _t_relation, _t_count, _t_background, _t_shapes_only, _t_colors_only, _t_positions]
# Complete descriptions are more common than partial ones, as in human captions.
WEIGHTS = [3, 2, 1.5, 2, 1, 0.7, 1.2]


MAX_WORDS = 30


def write_captions(scene: dict, k: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    tries = 0
    while len(out) < k and tries < 50 * k:
        tries += 1
        t = rng.choices(TEMPLATES, weights=WEIGHTS)[0]
        cap = t(scene, rng)
        if not cap:
            continue
        words = cap.split()
        if len(words) > MAX_WORDS and tries < 20 * k:
            continue  # too long for BLIP's 30-word limit: write another caption instead of cutting one
        cap = " ".join(words[:MAX_WORDS])
        if cap in out and tries < 20 * k:
            continue
        out.append(cap)
    return out


# ----------------------------------------------------------------------------- writing
SPLITS = ("train", "val", "test")
SPLIT_SIZES = ("num_train", "num_val", "num_test")


def _config_key(cfg: SynScenesConfig) -> dict:
    """Everything that determines the dataset's content (the root is only where it lives)."""
    d = asdict(cfg)
    d.pop("root")
    return {"format_version": FORMAT_VERSION, **d}


def _read_meta(root: Path) -> dict | None:
    try:
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_complete(root: Path, cfg: SynScenesConfig) -> bool:
    """meta.json matches cfg and every annotation file and image is there."""
    meta = _read_meta(root)
    if meta is None or meta.get("config") != _config_key(cfg):
        return False
    for split, attr in zip(SPLITS, SPLIT_SIZES):
        if not (root / "annotations" / f"synscenes_{split}.json").is_file():
            return False
        try:
            n_png = sum(1 for e in os.scandir(root / "images" / split) if e.name.endswith(".png"))
        except OSError:
            return False
        if n_png != getattr(cfg, attr):
            return False
    return True


def _looks_like_synscenes(root: Path) -> bool:
    """Safe to delete: an empty directory or one that holds a synscenes dataset (its meta.json says so)."""
    if not root.is_dir():
        return False
    if not any(root.iterdir()):
        return True
    meta = _read_meta(root)
    return meta is not None and meta.get("name") == "synscenes"


def _remove_stale_tmp(root: Path) -> None:
    """Remove `root.tmp-<pid>` / `root.old-<pid>` left by generations whose process is gone."""
    for p in root.parent.glob(f"{root.name}.tmp-*"):
        _remove_if_dead(p)
    for p in root.parent.glob(f"{root.name}.old-*"):
        _remove_if_dead(p)


def _remove_if_dead(p: Path) -> None:
    try:
        pid = int(p.name.rsplit("-", 1)[1])
    except ValueError:
        return
    # this process's own leftover (a failed earlier attempt) is litter too
    if pid == os.getpid() or not process_alive(pid):
        shutil.rmtree(p, ignore_errors=True)


def _write_split(tmp: Path, cfg: SynScenesConfig, split: str, n: int, hasher) -> None:
    (tmp / "images" / split).mkdir(parents=True)
    entries, scenes = [], []
    for i in range(n):
        rng = random.Random(f"synscenes-{cfg.seed}-{split}-{i}")
        scene = sample_scene(rng)
        name = f"{split}_{i:05d}"
        rel = f"images/{split}/{name}.png"
        render_scene(scene, cfg.image_size, cfg.supersample).save(tmp / rel, format="PNG", compress_level=1)
        caps = write_captions(scene, cfg.captions_per_image, rng)
        if split == "train":
            entries += [{"image": rel, "caption": c, "image_id": name} for c in caps]
        else:
            entries.append({"image": rel, "caption": caps, "image_id": name})
        scenes.append({"image": rel, **scene})
    ann = json.dumps(entries, indent=1)
    hasher.update(ann.encode())
    (tmp / "annotations" / f"synscenes_{split}.json").write_text(ann, encoding="utf-8")
    sc = json.dumps(scenes)
    hasher.update(sc.encode())
    (tmp / f"scenes_{split}.json").write_text(sc, encoding="utf-8")


def generate_synscenes(cfg: SynScenesConfig, overwrite: bool = False) -> Path:
    """Generate the dataset into cfg.root and return the root.

    It is a cache: when `root/meta.json` matches cfg (and all files are there) nothing is
    written. Otherwise (or with overwrite=True) the dataset is generated into
    `root.tmp-<pid>` and renamed into place, so an interrupted run never leaves a dataset that
    looks complete. An existing root is replaced only if it is empty or a synscenes dataset;
    any other directory raises DataError rather than being deleted.
    """
    root = Path(cfg.root).expanduser().absolute()
    if not overwrite and _is_complete(root, cfg):
        return root
    if root.exists() and not _looks_like_synscenes(root):
        raise DataError(
            f"synscenes root {root} exists and is not a synscenes dataset (no meta.json naming it); "
            f"point data.root at an empty or new directory instead of deleting its contents"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / "annotations").mkdir(parents=True)
        hasher = hashlib.sha256(json.dumps(_config_key(cfg), sort_keys=True).encode())
        for split, attr in zip(SPLITS, SPLIT_SIZES):
            _write_split(tmp, cfg, split, getattr(cfg, attr), hasher)
        meta = {
            "name": "synscenes",
            "format_version": FORMAT_VERSION,
            "config": _config_key(cfg),
            "fingerprint": hasher.hexdigest()[:16],  # of the config and every annotation/scene file
            "image_root": ".",
            "annotations": {s: f"annotations/synscenes_{s}.json" for s in SPLITS},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if not overwrite and _is_complete(root, cfg):
            shutil.rmtree(tmp)  # another process finished the same dataset meanwhile
            return root
        old = root.parent / f"{root.name}.old-{os.getpid()}"
        if root.exists():
            os.replace(root, old)
        os.replace(tmp, root)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def synscenes_fingerprint(root: str | Path) -> str | None:
    """The content fingerprint stored in root/meta.json (None when there is no dataset)."""
    meta = _read_meta(Path(root))
    return None if meta is None else meta.get("fingerprint")


def load_synscenes(root: str | Path, split: str, preprocess: bool = True, max_words=30) -> Split:
    """One split of a generated dataset, read through the same BLIP loader as Flickr30K."""
    if split not in SPLITS:
        raise DataError(f"synscenes has the splits {SPLITS}, not {split!r}")
    root = Path(root)
    return load_blip_split(root / "annotations" / f"synscenes_{split}.json", root, split, preprocess, max_words)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Generate the synscenes dataset")
    p.add_argument("--root", required=True)
    for f in ("image_size", "supersample", "num_train", "num_val", "num_test", "captions_per_image", "seed"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(SynScenesConfig, f))
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        cfg = SynScenesConfig(**{k: v for k, v in vars(a).items() if k != "overwrite"})
        cached = not a.overwrite and _is_complete(Path(cfg.root).expanduser().absolute(), cfg)
        t0 = time.perf_counter()
        root = generate_synscenes(cfg, overwrite=a.overwrite)
    except DataError as exc:
        raise SystemExit(f"error: {exc}")
    n = cfg.num_train + cfg.num_val + cfg.num_test
    how = "already there (cached)" if cached else f"generated in {time.perf_counter() - t0:.1f}s"
    print(f"synscenes: {n} images ({cfg.num_train}/{cfg.num_val}/{cfg.num_test}) at {cfg.image_size}px {how}")
    print(f"wrote {root}")


if __name__ == "__main__":
    main()
