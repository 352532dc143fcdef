"""Annotation loaders: BLIP/ALBEF JSON, Karpathy JSON, and plain JSONL/CSV pair tables.

Every loader returns `Split`s with absolute image paths, pre-processed captions and the
caption -> image map, and checks that each referenced image exists. Errors name the file, the
entry and the field.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mmdd.data.captions import normalize_captions
from mmdd.errors import DataError

log = logging.getLogger(__name__)

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
    sources: list[str] = field(default_factory=list)  # per image: the annotation entry that first named it

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


MAX_LISTED = 5  # entries named in a warning about duplicates
# Where Flickr30K, Flickr8k and COCO images usually live after extraction
USUAL_IMAGE_FOLDERS = ("flickr30k-images", "flickr30k_images", "Flicker8k_Dataset", "Flickr8k_Dataset", "images",
                       "train2014", "val2014")


def image_folder_hint(image_root: Path, image_rel: str) -> str:
    """For a missing image: the usual image folders found under data.image_root (or its parent), and the setting
    that would find the image there."""
    found = []
    for base in dict.fromkeys([image_root, image_root.parent]):
        for name in USUAL_IMAGE_FOLDERS:
            folder = base / name
            if folder.is_dir() and folder != image_root:
                found.append(folder)
    if not found:
        return (f"; none of the usual image folders ({', '.join(USUAL_IMAGE_FOLDERS)}) is under {image_root} or "
                f"{image_root.parent}")
    holding = [f for f in found if (f / image_rel).is_file()]
    if holding:
        return f"; it is in {holding[0]}: set data.image_root={holding[0]}"
    return "; usual image folders found: " + ", ".join(str(f) for f in found) + " (none holds this image)"


class _SplitBuilder:
    """Groups (image, caption) rows into unique images in first-seen order.

    `one_entry_per_image`: the format gives each image one entry with all its captions (BLIP val/test, Karpathy),
    so an image listed twice is an error (merging would silently give it both entries' captions); in formats of one
    row per pair, repeated images are normal and only exact duplicate rows are reported (a warning).
    """

    def __init__(self, name: str, image_root: Path, source: Path, preprocess: bool, max_words,
                 one_entry_per_image: bool = False):
        self.split = Split(name)
        self.index: dict[str, int] = {}
        self.image_root = Path(image_root).expanduser().absolute()
        self.source = source
        self.preprocess = preprocess
        self.max_words = max_words
        self.one_entry_per_image = one_entry_per_image
        self.first_entry: dict[str, str] = {}  # image -> the entry that named it first
        self.rows: set[tuple[str, str]] = set()
        self.duplicate_rows: list[str] = []

    def add(self, image_rel: str, captions: list, where: str, field: str = "image") -> None:
        if not isinstance(image_rel, str) or not image_rel.strip():
            raise DataError(f"{self.source}: {where}: field '{field}' must be a non-empty string, got {image_rel!r}")
        caps = normalize_captions(captions, self.preprocess, self.max_words, f"{self.source}: {where}")
        if self.one_entry_per_image and image_rel in self.index:
            first = self.first_entry[image_rel]
            raise DataError(
                f"{self.source}: {where} lists image {image_rel!r} again ({first} lists it first); in this format "
                f"each image of the {self.split.name} split has one entry with all its captions: merge the two "
                "entries' captions into one entry, or remove one")
        for raw in captions:
            row = (image_rel, str(raw))
            if row in self.rows:
                self.duplicate_rows.append(where)
            self.rows.add(row)
        if image_rel not in self.index:
            path = self.image_root / image_rel
            if not path.is_file():
                what = "is not a file" if path.exists() else "does not exist"
                raise DataError(
                    f"{self.source}: {where}: image {path} {what}; check data.image_root ({self.image_root}) "
                    f"and that the images were downloaded/extracted there{image_folder_hint(self.image_root, image_rel)}"
                )
            self.index[image_rel] = len(self.split.image_paths)
            self.split.image_paths.append(path)
            self.split.sources.append(f"{self.source}: {where}")
            self.first_entry[image_rel] = where
        img = self.index[image_rel]
        for c in caps:
            self.split.captions.append(c)
            self.split.txt2img.append(img)

    def done(self) -> Split:
        if self.duplicate_rows:
            n = len(self.duplicate_rows)
            log.warning("%s: %d (image, caption) row%s repeat an earlier row exactly (%s%s); each repeat trains as one "
                        "more example of the same pair: remove them if they are not intended", self.source, n,
                        "s" if n > 1 else "", ", ".join(self.duplicate_rows[:MAX_LISTED]),
                        ", ..." if n > MAX_LISTED else "")
        return self.split


def warn_shared_images(splits: dict[str, Split]) -> None:
    """Warn (with counts and a few entries) about images that appear in two splits: retrieval on the second split
    then partly measures memorisation of the first."""
    names = [s for s in ("train", "val", "test") if s in splits]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            where_a = dict(zip(splits[a].image_paths, splits[a].sources))
            shared = [(p, src) for p, src in zip(splits[b].image_paths, splits[b].sources) if p in where_a]
            if shared:
                listed = "; ".join(f"{p.name} ({where_a[p]} and {src})" for p, src in shared[:MAX_LISTED])
                log.warning("%d image%s of the %s split %s also in the %s split (%s%s): its retrieval numbers partly "
                            "measure memorisation; check the annotation files", len(shared),
                            "s" if len(shared) > 1 else "", b, "are" if len(shared) > 1 else "is", a, listed,
                            "; ..." if len(shared) > MAX_LISTED else "")


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise DataError(f"annotation file {path} does not exist; {what}")
    if not path.is_file():
        raise DataError(f"annotation file {path} is not a file; {what}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); re-save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"annotation file {path} could not be read ({exc})") from exc


def _read_json(path: Path, what: str):
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; "
            f"the file may be truncated (re-download it) or hand-edited"
        ) from exc


def load_blip_split(ann_file: Path, image_root: Path, split: str, preprocess: bool = True, max_words=30) -> Split:
    """BLIP/ALBEF JSON: train = one entry per caption; val/test = one entry per image with a caption list."""
    ann_file, image_root = Path(ann_file), Path(image_root)
    entries = _read_json(ann_file, BLIP_SOURCE)
    if not isinstance(entries, list):
        raise DataError(f"{ann_file}: the top level must be a list of entries, got {type(entries).__name__}")
    # BLIP's train files have one entry per caption; its val/test files one entry per image with a caption list.
    b = _SplitBuilder(split, image_root, ann_file, preprocess, max_words, one_entry_per_image=split != "train")
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
        raise DataError(f"{ann_file}: the {split} split has no entries; every split (train, val, test) needs at least "
                        "one image: add entries, or point data.ann_files to the right file")
    return out


def load_karpathy(ann_file: Path, image_root: Path, preprocess: bool = True, max_words=30) -> dict[str, Split]:
    """Karpathy's dataset_{flickr30k,coco}.json; `restval` joins train."""
    ann_file, image_root = Path(ann_file), Path(image_root)
    doc = _read_json(ann_file, "Karpathy's split files (dataset_flickr30k.json, dataset_coco.json) come "
                               "from https://cs.stanford.edu/people/karpathy/deepimagesent/")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{ann_file}: expected an object with an 'images' list (Karpathy format)")
    builders = {s: _SplitBuilder(s, image_root, ann_file, preprocess, max_words, one_entry_per_image=True)
                for s in ("train", "val", "test")}
    for i, e in enumerate(doc["images"]):
        where = f"images[{i}]"
        if not isinstance(e, dict):
            raise DataError(f"{ann_file}: {where} must be an object")
        for key in ("filename", "split", "sentences"):
            if key not in e:
                raise DataError(f"{ann_file}: {where} has no '{key}' field")
        for key in ("filename", "split"):
            if not isinstance(e[key], str) or not e[key]:
                raise DataError(f"{ann_file}: {where}: field '{key}' must be a non-empty string, got {e[key]!r}")
        filepath = e.get("filepath") or ""
        if not isinstance(filepath, str):
            raise DataError(f"{ann_file}: {where}: field 'filepath' must be a string, got {filepath!r}")
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
        rel = str(Path(filepath) / e["filename"])
        builders[split].add(rel, caps, where, field="filename")
    return {s: b.done() for s, b in builders.items()}


def load_pairs_table(ann_file: Path, image_root: Path, split: str, preprocess: bool = True, max_words=30) -> Split:
    """A plain table of (image, caption) rows: JSONL objects or CSV with an `image,caption` header.

    The format follows the suffix (.jsonl or .csv); rows are grouped by image in first-seen order.
    Errors name the 1-based line number of the file.
    """
    ann_file, image_root = Path(ann_file), Path(image_root)
    suffix = ann_file.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise DataError(f"{ann_file}: unknown table format {suffix!r}; use .jsonl or .csv")
    text = _read_text(ann_file, "write one row per (image, caption) pair (JSONL objects or CSV with an image,caption header)")
    b = _SplitBuilder(split, image_root, ann_file, preprocess, max_words)
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{ann_file}: line {n} is not valid JSON ({exc.msg}, column {exc.colno})") from exc
            if not isinstance(row, dict) or "image" not in row or "caption" not in row:
                raise DataError(f"{ann_file}: line {n} needs the fields 'image' and 'caption' (one JSON object per line)")
            b.add(row["image"], [row["caption"]], f"line {n}")
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader, None)
            cols = [c.strip().lower() for c in header] if header else []
            if "image" not in cols or "caption" not in cols:
                raise DataError(f"{ann_file}: the header (line 1) must name the columns 'image' and 'caption', got {header}")
            ii, ci = cols.index("image"), cols.index("caption")
            for row in reader:
                n = reader.line_num
                if not any(c.strip() for c in row):
                    continue
                if len(row) <= max(ii, ci):
                    raise DataError(f"{ann_file}: line {n} has {len(row)} columns, expected at least {max(ii, ci) + 1}")
                b.add(row[ii].strip(), [row[ci]], f"line {n}")
        except csv.Error as exc:
            raise DataError(f"{ann_file}: line {reader.line_num} is not valid CSV ({exc})") from exc
    out = b.done()
    if not out.image_paths:
        raise DataError(f"{ann_file}: the {split} split has no rows; every split (train, val, test) needs at least one "
                        "image: add (image, caption) rows, or point data.ann_files to the right file")
    return out
