"""synscenes: the embedded procedural image-caption dataset (the default dataset).

Scenes of 1-3 coloured shapes on a patterned background, drawn supersampled and downscaled,
each with five captions written like human ones (templates, synonyms, spatial relations,
counts, partial descriptions). Written to disk in the BLIP/ALBEF annotation format plus PNGs,
so it is read back through the same loader as Flickr30K. Deterministic by seed: every image
has its own RNG seeded from (seed, split, index).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mmdd.data.annotations import Split, load_blip_split

FORMAT_VERSION = 1

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
        if not 8 <= int(self.image_size) <= 224:
            raise ValueError(f"synscenes image_size must be within 8..224, got {self.image_size}")
        if min(self.num_train, self.num_val, self.num_test) < 1 or self.captions_per_image < 1:
            raise ValueError("synscenes split sizes and captions_per_image must be >= 1")


# ----------------------------------------------------------------------------- scenes
def sample_scene(rng: random.Random) -> dict:
    n = rng.choice((1, 2, 2, 3, 3))
    cells = rng.sample(range(9), n)
    objects = []
    for k, cell in enumerate(cells):
        if k > 0 and rng.random() < 0.3:  # repeat an earlier object's look, so counts appear
            src = objects[rng.randrange(k)]
            shape, color = src["shape"], src["color"]
        else:
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
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
    return {
        "background": {"color": rng.choice(list(BACKGROUNDS)), "pattern": rng.choice(PATTERNS)},
        "objects": objects,
    }


def _shade(rgb, f):
    return tuple(int(max(0, min(255, c * f))) for c in rgb)


def _draw_background(draw: ImageDraw.ImageDraw, side: int, bg: dict) -> None:
    base = BACKGROUNDS[bg["color"]]
    alt = _shade(base, 0.7 if sum(base) > 400 else 1.35)
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
    shapes = [_article(rng.choice(SHAPE_WORDS[o["shape"]])) for o in scene["objects"]]
    return rng.choice(["some shapes:", "shapes including", "a scene with", ""]) + " " + _join(shapes)


def _t_colors_only(scene, rng):
    colors = sorted({o["color"] for o in scene["objects"]}, key=lambda c: rng.random())
    return rng.choice(["something", "a few things that are", "objects colored", "shapes in"]) + " " + _join(colors)


def _t_positions(scene, rng):
    o = rng.choice(scene["objects"])
    return f"{_article(_noun(o, rng, size=False, color=rng.random() < 0.7))} {_position(o, rng)}"


TEMPLATES = [_t_full, _t_relation, _t_count, _t_background, _t_shapes_only, _t_colors_only, _t_positions]
# Complete descriptions are more common than partial ones, as in human captions.
WEIGHTS = [3, 2, 1.5, 2, 1, 0.7, 1.2]


def write_captions(scene: dict, k: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    tries = 0
    while len(out) < k and tries < 50 * k:
        tries += 1
        t = rng.choices(TEMPLATES, weights=WEIGHTS)[0]
        cap = t(scene, rng)
        if not cap:
            continue
        cap = " ".join(cap.split())
        if cap in out and tries < 20 * k:
            continue
        out.append(" ".join(cap.split()[:30]))
    return out


# ----------------------------------------------------------------------------- writing
SPLIT_SIZES = ("num_train", "num_val", "num_test")


def _fingerprint(cfg: SynScenesConfig) -> dict:
    d = asdict(cfg)
    d.pop("root")
    return {"format_version": FORMAT_VERSION, **d}


def _is_complete(root: Path, cfg: SynScenesConfig) -> bool:
    meta = root / "meta.json"
    if not meta.exists():
        return False
    try:
        saved = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    if saved.get("config") != _fingerprint(cfg):
        return False
    return all((root / "annotations" / f"synscenes_{s}.json").exists() for s in ("train", "val", "test"))


def generate_synscenes(cfg: SynScenesConfig, overwrite: bool = False) -> Path:
    """Generate the dataset into cfg.root (a cache: reused when its meta.json matches cfg)."""
    root = Path(cfg.root)
    if not overwrite and _is_complete(root, cfg):
        return root
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "annotations").mkdir(parents=True)
    for split, attr in zip(("train", "val", "test"), SPLIT_SIZES):
        n = int(getattr(cfg, attr))
        (tmp / "images" / split).mkdir(parents=True)
        entries, scenes = [], []
        for i in range(n):
            rng = random.Random(f"synscenes-{cfg.seed}-{split}-{i}")
            scene = sample_scene(rng)
            rel = f"images/{split}/{split}_{i:05d}.png"
            render_scene(scene, cfg.image_size, cfg.supersample).save(tmp / rel, format="PNG")
            caps = write_captions(scene, cfg.captions_per_image, rng)
            if split == "train":
                entries += [{"image": rel, "caption": c, "image_id": f"{split}_{i:05d}"} for c in caps]
            else:
                entries.append({"image": rel, "caption": caps})
            scenes.append({"image": rel, **scene})
        (tmp / "annotations" / f"synscenes_{split}.json").write_text(json.dumps(entries, indent=0))
        (tmp / f"scenes_{split}.json").write_text(json.dumps(scenes))
    (tmp / "meta.json").write_text(json.dumps({"name": "synscenes", "config": _fingerprint(cfg)}, indent=2))
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


def load_synscenes(root: str | Path, split: str, preprocess: bool = True, max_words=30) -> Split:
    root = Path(root)
    return load_blip_split(root / "annotations" / f"synscenes_{split}.json", root, split, preprocess, max_words)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Generate the synscenes dataset")
    p.add_argument("--root", required=True)
    for f in ("image_size", "supersample", "num_train", "num_val", "num_test", "captions_per_image", "seed"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(SynScenesConfig, f))
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    cfg = SynScenesConfig(**{k: v for k, v in vars(a).items() if k != "overwrite"})
    print(generate_synscenes(cfg, overwrite=a.overwrite))


if __name__ == "__main__":
    main()
