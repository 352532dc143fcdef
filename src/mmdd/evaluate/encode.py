"""Encode a split with a dual encoder and score retrieval."""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmdd.data.splits import SplitData
from mmdd.evaluate.retrieval import retrieval_metrics
from mmdd.models.dual_encoder import backbone_fingerprint
from mmdd.utils.io import atomic_write, stable_hash

log = logging.getLogger(__name__)


def model_dtype(model) -> torch.dtype:
    """The dtype the model computes in (its parameters': float64 under hardware.precision=64-true): inputs are cast
    to it; embeddings come back in float32, or float64 from a float64 model (numerical checks keep their precision)."""
    return next(model.parameters()).dtype


def embedding_dtype(model) -> torch.dtype:
    return torch.float64 if model_dtype(model) == torch.float64 else torch.float32


def chunks(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def backbone_features(model, data: SplitData, rows: range, device):
    """The backbone's features of a split's images `rows` (no grad and eval mode are the caller's); the uint8 images
    move to the device and are normalised there."""
    return model.features(data.normalise(data.image_batch(rows).to(device)).to(model_dtype(model)))


def backbone_batches(model, data: SplitData, batch_size: int, device):
    """The backbone's features of a split's images, batch by batch (no grad; caller sets eval mode)."""
    for rows in chunks(data.num_images, batch_size):
        yield backbone_features(model, data, rows, device)


def split_content(data: SplitData) -> str:
    """Which images a split holds: their paths with each file's size and modification time (so an edited or
    another dataset of the same name and size never shares cached features)."""
    h = hashlib.sha1()
    for p in data.split.image_paths:
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|?\n".encode())
    return f"{data.num_images}:{h.hexdigest()[:16]}"


class BackboneFeatures:
    """Features of a frozen backbone for whole splits, computed once and reused by every student that
    stands on the same backbone (the K seeds of an evaluation, every evaluation point of each).

    Keyed by (backbone fingerprint, split, the split's normalisation); only valid for a frozen, batch-independent
    backbone (`DualEncoder.backbone_is_cacheable`), and students do not augment, so reuse is exact.
    With `cache_dir`, splits are also kept on disk (`<cache_dir>/backbone_features/`), so later evaluations
    (other sets, sweep trials, reruns) on the same backbone and data skip the backbone entirely; `data_key`
    says which data (mmdd.identity.data_identity's hash).
    """

    def __init__(self, batch_size: int, cache_dir: str | Path | None = None, data_key: str = ""):
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir) / "backbone_features" if cache_dir else None
        self.data_key = data_key
        self._cache: dict[tuple, torch.Tensor] = {}
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # frozen: hashed once per model
        self._contents: dict[int, str] = {}

    @torch.no_grad()
    def split(self, model, data: SplitData) -> torch.Tensor:
        if model not in self._fingerprints:
            self._fingerprints[model] = backbone_fingerprint(model)
        if id(data) not in self._contents:  # the splits outlive this cache (one evaluation)
            self._contents[id(data)] = split_content(data)
        key = (self._fingerprints[model], data.split.name, self._contents[id(data)], data.mean, data.std)
        dtype = embedding_dtype(model)
        if dtype != torch.float32:  # a float64 student (hardware.precision=64-true) keeps float64 features
            key += (str(dtype),)
        device = next(model.parameters()).device
        if torch.is_autocast_enabled(device.type):  # features computed under bf16/fp16 autocast are not fp32 ones
            key += (f"autocast {torch.get_autocast_dtype(device.type)}",)
        if key not in self._cache:
            self._cache[key] = self._from_disk(key, data.num_images)
        if self._cache[key] is None:
            was_training = model.training
            model.eval()
            batches = backbone_batches(model, data, self.batch_size, device)
            self._cache[key] = torch.cat([f.to(dtype).cpu() for f in batches])
            model.train(was_training)
            self._to_disk(key, self._cache[key])
        return self._cache[key]

    def _path(self, key: tuple) -> Path | None:
        return self.cache_dir / f"{stable_hash([*key, self.data_key], length=20)}.safetensors" if self.cache_dir else None

    def _from_disk(self, key: tuple, rows: int) -> torch.Tensor | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        try:
            feats = load_file(str(path))["features"]
        except (SafetensorError, KeyError, OSError) as exc:
            log.warning("backbone feature cache %s is unreadable (%s); recomputing", path, exc)
            return None
        return feats if feats.shape[0] == rows else None

    def _to_disk(self, key: tuple, feats: torch.Tensor) -> None:
        path = self._path(key)
        if path is not None:
            atomic_write(path, lambda p: save_file({"features": feats.contiguous()}, str(p),
                                                   metadata={"split": str(key[1]), "backbone": str(key[0])}))


def encode_images(model, data: SplitData, rows: range, device, features: BackboneFeatures | None = None):
    """L2-normalised joint-space embeddings of a split's images `rows` (eval mode and no grad are the caller's);
    with `features` (a frozen backbone's cache) only the image head runs."""
    if features is not None:
        backbone = features.split(model, data)[rows.start : rows.stop]
    else:
        backbone = backbone_features(model, data, rows, device)
    return F.normalize(model.image_head(backbone.to(device, model_dtype(model))), dim=-1).to(embedding_dtype(model))


def encode_texts(model, data: SplitData, rows: range, device):
    """Joint-space embeddings of a split's captions `rows`."""
    return model.encode_text(data.text_emb[rows.start : rows.stop].to(device, model_dtype(model))).to(embedding_dtype(model))


@torch.no_grad()
def encode_split(model, data: SplitData, batch_size: int, device=None,
                 features: BackboneFeatures | None = None):
    """Return (image_features [n_img, D], text_features [n_cap, D]) L2-normalised.

    With `features` (a frozen backbone's cache) only the image head runs on the cached backbone features.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    img = torch.cat([encode_images(model, data, rows, device, features)
                     for rows in chunks(data.num_images, batch_size)])
    txt = torch.cat([encode_texts(model, data, rows, device) for rows in chunks(data.text_emb.shape[0], batch_size)])
    model.train(was_training)
    return img, txt


def evaluate_retrieval(model, data: SplitData, batch_size: int,
                       features: BackboneFeatures | None = None) -> dict[str, float]:
    img, txt = encode_split(model, data, batch_size, features=features)
    return retrieval_metrics((img @ txt.t()).cpu(), data.txt2img)
