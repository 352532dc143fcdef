"""From the `data` config to in-memory splits: annotations, images, cached caption embeddings.

Every dataset, the embedded `synscenes` included, goes through the same annotation loaders,
so the default run exercises the real loading path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmdd.data.annotations import Split, load_blip_split, load_karpathy, load_pairs_table, warn_shared_images
from mmdd.data.image_cache import decoded_images, verify_images
from mmdd.data.images import load_images_tensor
from mmdd.data.sample_augment import PerImageAugment
from mmdd.data.text_cache import LazyTextEncoder, embed_captions
from mmdd.data.transforms import normalize
from mmdd.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class SplitData:
    """One split: its annotation, the caption embeddings and (optionally) its decoded images, with the normalisation
    (`data.mean`/`data.std`) every model input of it goes through: `normalised(idx)` is a batch as the models see it."""

    split: Split
    text_emb: torch.Tensor  # [n_captions, D]
    image_size: int
    images: torch.Tensor | None = None  # uint8 [n_images, 3, S, S]: in memory (preload) or memory-mapped (cache)
    resize: str = "center_crop"  # how a decoded image becomes S x S (mmdd.data.images.resize_image)
    original_sizes: torch.Tensor | None = None  # [n_images, 2] (width, height) of the files; read on demand if None
    mean: tuple[float, ...] | None = None  # per channel (data.mean); None: a split read for its images only
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.mean is not None:
            self.mean = tuple(float(m) for m in self.mean)
        if self.std is not None:
            self.std = tuple(float(s) for s in self.std)

    @property
    def txt2img(self) -> torch.Tensor:
        return torch.as_tensor(self.split.txt2img, dtype=torch.long)

    @property
    def num_images(self) -> int:
        return len(self.split.image_paths)

    def image(self, i: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[i]
        return load_images_tensor([self.split.image_paths[i]], self.image_size, resize=self.resize)[0]

    def original_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image i's file (for crops drawn in the original's geometry)."""
        if self.original_sizes is not None:
            return int(self.original_sizes[i, 0]), int(self.original_sizes[i, 1])
        with Image.open(self.split.image_paths[i]) as img:  # the header only
            return img.size

    def image_batch(self, idx) -> torch.Tensor:
        idx = [int(i) for i in idx]
        if self.images is not None:
            return self.images[idx]
        return load_images_tensor([self.split.image_paths[i] for i in idx], self.image_size, resize=self.resize)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images of this split (uint8, or [0, 1] floats, on any device) as the models see them: (x - mean) / std.
        Loaders hand uint8 batches to the device and normalise there (a quarter of the bytes to move)."""
        if self.mean is None or self.std is None:
            raise DataError(f"split {self.split.name!r} was built without data.mean/data.std, so its images cannot be "
                            "normalised: load it with mmdd.data.splits.load_data, or pass SplitData(mean=..., std=...)")
        return normalize(images, self.mean, self.std)

    def normalised(self, idx) -> torch.Tensor:
        """Images `idx`, normalised (float32 [n, 3, S, S])."""
        return self.normalise(self.image_batch(idx))


class PairDataset(Dataset):
    """Training pairs (uint8 image, caption embedding).

    unit=caption: every caption is one example (the papers' Flickr/COCO training sets);
    unit=image: one example per image with a caption drawn at random on each access.
    `augment` (data.augment.style=blip): the per-image train transform, applied as each example is read.
    """

    def __init__(self, data: SplitData, unit: str = "caption", augment: PerImageAugment | None = None):
        if unit not in ("caption", "image"):
            raise ValueError(f"data.train_unit must be 'caption' or 'image', got {unit!r}")
        self.data = data
        self.unit = unit
        self.img2txt = data.split.img2txt()
        self.augment = augment

    def __len__(self) -> int:
        return len(self.data.split.captions) if self.unit == "caption" else self.data.num_images

    def __getitem__(self, i: int):
        if self.unit == "caption":
            img = self.data.split.txt2img[i]
            cap = i
        else:
            img = i
            caps = self.img2txt[i]
            cap = caps[int(torch.randint(len(caps), (1,)))]
        image = self.data.image(img) if self.augment is None else self.augment(self.data, img)
        return image, self.data.text_emb[cap], img


def loader_options(data_cfg, on_gpu: bool) -> dict:
    """DataLoader keywords from the data config (conf/data/_loader.yaml): workers, pinned memory (auto: when the
    batches go to a GPU), workers kept between epochs, and how many batches each prepares ahead."""
    workers = loader_workers(data_cfg.get("num_workers", 0))
    pin = data_cfg.get("pin_memory", "auto")
    options = {"num_workers": workers, "pin_memory": on_gpu if str(pin) == "auto" else bool(pin)}
    if workers > 0:  # torch refuses both without workers
        options["persistent_workers"] = bool(data_cfg.get("persistent_workers", False))
        if data_cfg.get("prefetch_factor") is not None:
            options["prefetch_factor"] = int(data_cfg.prefetch_factor)
    return options


def loader_workers(setting) -> int:
    """`data.num_workers`: a count, or `auto` = the CPU cores this process may use, at most 8 (so a 2-core box gets
    2 and no warning about more workers than cores)."""
    if str(setting) == "auto":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return min(8, cores)
    try:
        workers = int(setting)
    except (TypeError, ValueError):
        workers = -1
    if workers < 0:
        raise DataError(f"data.num_workers must be a count >= 0 or auto, got {setting!r}")
    return workers


def check_full_batches(dataset: PairDataset, batch_size: int, key: str) -> None:
    """Training loaders drop the last partial batch: refuse a batch size larger than the train split, which would
    train on nothing (and crash deep inside the DataLoader), naming the setting to change."""
    if len(dataset) < batch_size:
        raise DataError(f"{key}={batch_size} is larger than the train split ({len(dataset)} {dataset.unit} examples; "
                        f"only full batches are used): set {key} to at most {len(dataset)}, or use more training data")


def load_annotations(data_cfg) -> dict[str, Split]:
    """Every split's annotation (checked; images shared between splits are warned about)."""
    splits = _load_annotations(data_cfg)
    warn_shared_images(splits)
    return splits


def _load_annotations(data_cfg) -> dict[str, Split]:
    fmt = str(data_cfg.format)
    # False, or the style of caption pre-processing (mmdd.data.captions)
    pre = str(data_cfg.preprocess.get("style", "mmdd")) if bool(data_cfg.preprocess.enabled) else False
    max_words = data_cfg.preprocess.max_words
    if fmt == "synscenes":
        from mmdd.data.synscenes import SynScenesConfig, generate_synscenes

        gen = SynScenesConfig(root=str(data_cfg.root), **dict(data_cfg.generate))
        generate_synscenes(gen)
    if fmt not in ANNOTATION_FORMATS:
        raise DataError(f"data.format={fmt!r} is unknown; use {', '.join(ANNOTATION_FORMATS)}")
    return ANNOTATION_FORMATS[fmt](data_cfg, Path(str(data_cfg.image_root)), pre, max_words)


def _per_split_files(load_split):
    """A format with one annotation file per split (data.ann_dir / data.ann_files[split])."""

    def load(data_cfg, image_root: Path, pre, max_words) -> dict[str, Split]:
        ann_dir = Path(str(data_cfg.ann_dir))
        return {s: load_split(ann_dir / str(data_cfg.ann_files[s]), image_root, s, preprocess=pre, max_words=max_words)
                for s in SPLITS}

    return load


def _karpathy(data_cfg, image_root: Path, pre, max_words) -> dict[str, Split]:
    """Karpathy's one file for every split (data.ann_file, images[].split)."""
    splits = load_karpathy(Path(str(data_cfg.ann_file)), image_root, preprocess=pre, max_words=max_words)
    for s in SPLITS:
        if s not in splits or not splits[s].image_paths:
            raise DataError(f"{data_cfg.ann_file}: the {s!r} split has no images (field images[].split); every "
                            "split (train, val, test) needs at least one image: mark some images as "
                            f"split {s!r}, or use another split file")
    return splits


# data.format -> its reader: (data config, image root, caption pre-processing, max words) -> {split: Split}
ANNOTATION_FORMATS = {
    "synscenes": _per_split_files(load_blip_split),  # generated above, written in the BLIP layout
    "blip": _per_split_files(load_blip_split),
    "karpathy": _karpathy,
    "table": _per_split_files(load_pairs_table),
}


def load_data(cfg, splits=SPLITS, annotations: dict[str, Split] | None = None) -> dict[str, SplitData]:
    """Load the requested splits of `cfg.data` with caption embeddings from `cfg.model.text` (`annotations`: the
    splits' annotations when the caller has read them already, e.g. to check the budget before anything slow).
    Every split's images are checked (and decoded, with the cache) before any caption is embedded: a broken image
    is reported in minutes, not after an hour of embedding."""
    anns = annotations or load_annotations(cfg.data)
    for s in splits:
        if not anns[s].image_paths:
            raise DataError(f"data split {s!r} of {cfg.data.name} is empty; check the annotation file for it")
    images = {s: split_images(cfg, anns[s], s) for s in splits}
    encoder = LazyTextEncoder(cfg.model.text)
    out: dict[str, SplitData] = {}
    for s in splits:
        split = anns[s]
        emb = embed_captions(cfg.model.text, split.captions, Path(str(cfg.paths.text_cache_dir)), encoder)
        pixels, sizes = images[s]
        out[s] = SplitData(split=split, text_emb=emb, image_size=cfg.data.image_size, images=pixels,
                           resize=str(cfg.data.resize), original_sizes=sizes, mean=tuple(cfg.data.mean),
                           std=tuple(cfg.data.std))
        log.info("%s/%s: %d images, %d captions", cfg.data.name, s, split.num_images, split.num_captions)
    return out


def split_images(cfg, split: Split, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A split's decoded images and the files' (width, height), as `data.decode_cache`/`data.preload` say: from the
    decode cache (memory-mapped, or read into memory), decoded into memory, or (None, None) when the files are read
    on every access, after checking that every one of them decodes."""
    size, resize, label = cfg.data.image_size, str(cfg.data.resize), f"{cfg.data.name}/{name}"
    cache = Path(str(cfg.paths.cache_dir)) / "images"
    if bool(cfg.data.decode_cache):
        decoded = decoded_images(split.image_paths, size, resize, cache, sources=split.sources, name=label)
        pixels = torch.from_numpy(decoded.pixels)
        return (pixels.clone() if bool(cfg.data.preload) else pixels), torch.from_numpy(decoded.original_sizes)
    if bool(cfg.data.preload):
        return load_images_tensor(split.image_paths, size, resize=resize, sources=split.sources, name=label), None
    verify_images(split.image_paths, cache, sources=split.sources, name=label)
    return None, None
