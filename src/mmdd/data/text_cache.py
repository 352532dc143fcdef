"""On-disk cache of caption embeddings, keyed by encoder, pooling and caption content."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmdd.utils.io import atomic_write, building, stable_hash

log = logging.getLogger(__name__)


def text_cache_key(text_cfg, captions: list[str]) -> str:
    content = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    encoder = {
        "name_or_path": str(text_cfg.name_or_path),
        "pooling": str(text_cfg.pooling),
        "max_length": int(text_cfg.max_length),
        "normalize": bool(text_cfg.normalize),
    }
    return stable_hash({"encoder": encoder, "captions": content}, length=20)


def embed_captions(text_cfg, captions: list[str], cache_dir: str | Path, encoder=None) -> torch.Tensor:
    """Return [len(captions), D] embeddings, computing and caching them on first use (once per cache: the other
    processes of a run started together wait for the one embedding them).

    `encoder` may be passed to reuse a loaded FrozenTextEncoder across splits.
    """
    cache_dir = Path(cache_dir)
    key = text_cache_key(text_cfg, captions)
    path = cache_dir / f"{key}.safetensors"
    emb = _cached(path, len(captions))
    if emb is not None:
        return emb
    with building(cache_dir / f".{key}.lock", f"the embeddings of {len(captions)} captions"):
        emb = _cached(path, len(captions))
        if emb is not None:
            return emb  # another process embedded them while this one waited
        if encoder is None:
            encoder = build_text_encoder(text_cfg)
        log.info("embedding %d captions with %s", len(captions), text_cfg.name_or_path)
        emb = encoder.encode(captions).contiguous()
        meta = {"name_or_path": str(text_cfg.name_or_path), "pooling": str(text_cfg.pooling),
                "count": str(len(captions))}
        atomic_write(path, lambda p: save_file({"embeddings": emb}, str(p), metadata=meta))
        atomic_write(cache_dir / f"{key}.json", lambda p: p.write_text(json.dumps(meta) + "\n"))
    return emb


def _cached(path: Path, count: int) -> torch.Tensor | None:
    if not path.exists():
        return None
    try:
        emb = load_file(str(path))["embeddings"]
        if emb.shape[0] == count:
            return emb
        log.warning("text cache %s has %d rows for %d captions; recomputing", path, emb.shape[0], count)
    except (SafetensorError, KeyError, OSError) as exc:
        log.warning("text cache %s is unreadable (%s); recomputing", path, exc)
    return None


class LazyTextEncoder:
    """Loads the encoder on first use, so fully cached runs never load the model."""

    def __init__(self, text_cfg):
        self.text_cfg = text_cfg
        self._encoder = None

    def encode(self, captions: list[str]) -> torch.Tensor:
        if self._encoder is None:
            self._encoder = build_text_encoder(self.text_cfg)
        return self._encoder.encode(captions)


def build_text_encoder(text_cfg):
    from mmdd.models.text_encoder import FrozenTextEncoder

    device = str(text_cfg.get("device", "auto"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return FrozenTextEncoder(
        str(text_cfg.name_or_path),
        pooling=str(text_cfg.pooling),
        max_length=int(text_cfg.max_length),
        normalize=bool(text_cfg.normalize),
        batch_size=int(text_cfg.batch_size),
        device=device,
    )
