"""Annotation loaders: BLIP/ALBEF JSON, Karpathy JSON, and plain JSONL/CSV pair tables.

Every loader returns `Split`s with absolute image paths, pre-processed captions and the
caption -> image map, and checks that each referenced image exists. Errors name the file, the
entry and the field.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from mmdd.data.captions import normalize_captions
from mmdd.errors import DataError

BLIP_SOURCE = (
    "the BLIP/ALBEF annotation files are linked from the BLIP repository "
    "(e.g. https://storage.googleapis.com/sfr-vision-language-research/datasets/flickr30k_train.json); "
    "put them in data.ann_dir"
)


@dataclass
class Split:
    name: str
    image_paths: list[Path] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    txt2img: list[int] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def img2txt(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.image_paths]
        for t, i in enumerate(self.txt2img):
            out[i].append(t)
        return out


class _SplitBuilder:
    """Groups (image, caption) rows into unique images in first-seen order."""

    def __init__(self, name: str, image_root: Path, source: Path, preprocess: bool, max_words):
        self.split = Split(name)
        self.index: dict[str, int] = {}
        self.image_root = image_root
        self.source = source
        self.preprocess = preprocess
        self.max_words = max_words

    def add(self, image_rel: str, captions: list, where: str) -> None:
        if not isinstance(image_rel, str) or not image_rel:
            raise DataError(f"{self.source}: {where}: field 'image' must be a non-empty string, got {image_rel!r}")
        caps = normalize_captions(captions, self.preprocess, self.max_words, f"{self.source}: {where}")
        if image_rel not in self.index:
            path = self.image_root / image_rel
            if not path.exists():
                raise DataError(
                    f"{self.source}: {where}: image {path} does not exist; check data.image_root ({self.image_root})"
                )
            self.index[image_rel] = len(self.split.image_paths)
            self.split.image_paths.append(path)
        img = self.index[image_rel]
        for c in caps:
            self.split.captions.append(c)
            self.split.txt2img.append(img)

    def done(self) -> Split:
        return self.split


def _read_json(path: Path, what: str):
    if not path.exists():
        raise DataError(f"annotation file {path} does not exist; {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from exc


def load_blip_split(ann_file: Path, image_root: Path, split: str, preprocess: bool = True, max_words=30) -> Split:
    """BLIP/ALBEF JSON: train = one entry per caption; val/test = one entry per image with a caption list."""
    ann_file, image_root = Path(ann_file), Path(image_root)
    entries = _read_json(ann_file, BLIP_SOURCE)
    if not isinstance(entries, list):
        raise DataError(f"{ann_file}: the top level must be a list of entries, got {type(entries).__name__}")
    b = _SplitBuilder(split, image_root, ann_file, preprocess, max_words)
    for i, e in enumerate(entries):
        where = f"entry {i}"
        if not isinstance(e, dict):
            raise DataError(f"{ann_file}: {where} must be an object with 'image' and 'caption', got {type(e).__name__}")
        for key in ("image", "caption"):
            if key not in e:
                raise DataError(f"{ann_file}: {where} has no '{key}' field")
        cap = e["caption"]
        if isinstance(cap, str):
            caps = [cap]
        elif isinstance(cap, list):
            if not cap:
                raise DataError(f"{ann_file}: {where}: field 'caption' is an empty list")
            caps = cap
        else:
            raise DataError(f"{ann_file}: {where}: field 'caption' must be a string or a list of strings")
        b.add(e["image"], caps, where)
    out = b.done()
    if not out.image_paths:
        raise DataError(f"{ann_file}: the {split} split has no entries")
    return out


def load_karpathy(ann_file: Path, image_root: Path, preprocess: bool = True, max_words=30) -> dict[str, Split]:
    """Karpathy's dataset_{flickr30k,coco}.json; `restval` joins train."""
    ann_file, image_root = Path(ann_file), Path(image_root)
    doc = _read_json(ann_file, "Karpathy's split files (dataset_flickr30k.json, dataset_coco.json) come "
                               "from https://cs.stanford.edu/people/karpathy/deepimagesent/")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{ann_file}: expected an object with an 'images' list (Karpathy format)")
    builders = {s: _SplitBuilder(s, image_root, ann_file, preprocess, max_words) for s in ("train", "val", "test")}
    for i, e in enumerate(doc["images"]):
        where = f"images[{i}]"
        if not isinstance(e, dict):
            raise DataError(f"{ann_file}: {where} must be an object")
        for key in ("filename", "split", "sentences"):
            if key not in e:
                raise DataError(f"{ann_file}: {where} has no '{key}' field")
        split = {"restval": "train"}.get(e["split"], e["split"])
        if split not in builders:
            raise DataError(f"{ann_file}: {where}: unknown split {e['split']!r} (train, val, test or restval)")
        sents = e["sentences"]
        if not isinstance(sents, list) or not sents:
            raise DataError(f"{ann_file}: {where}: 'sentences' must be a non-empty list")
        caps = []
        for j, s in enumerate(sents):
            if not isinstance(s, dict) or "raw" not in s:
                raise DataError(f"{ann_file}: {where}.sentences[{j}] has no 'raw' field")
            caps.append(s["raw"])
        rel = str(Path(e.get("filepath") or "") / e["filename"])
        builders[split].add(rel, caps, where)
    return {s: b.done() for s, b in builders.items()}


def load_pairs_table(ann_file: Path, image_root: Path, split: str, preprocess: bool = True, max_words=30) -> Split:
    """A plain table of (image, caption) rows: JSONL objects or CSV with an `image,caption` header."""
    ann_file, image_root = Path(ann_file), Path(image_root)
    if not ann_file.exists():
        raise DataError(f"annotation file {ann_file} does not exist; write one row per (image, caption) pair")
    b = _SplitBuilder(split, image_root, ann_file, preprocess, max_words)
    suffix = ann_file.suffix.lower()
    if suffix == ".jsonl":
        for n, line in enumerate(ann_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{ann_file}: line {n} is not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or "image" not in row or "caption" not in row:
                raise DataError(f"{ann_file}: line {n} needs the fields 'image' and 'caption'")
            b.add(row["image"], [row["caption"]], f"line {n}")
    elif suffix == ".csv":
        with ann_file.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise DataError(f"{ann_file}: the header must name the columns 'image' and 'caption', got {reader.fieldnames}")
            for n, row in enumerate(reader, start=2):
                b.add(row["image"], [row["caption"] or ""], f"line {n}")
    else:
        raise DataError(f"{ann_file}: unknown table format {suffix!r}; use .jsonl or .csv")
    out = b.done()
    if not out.image_paths:
        raise DataError(f"{ann_file}: the {split} split has no rows")
    return out
