"""Encode a split with a dual encoder and score retrieval."""

from __future__ import annotations

import hashlib
import weakref

import torch
import torch.nn.functional as F

from mmdd.data.datamodule import SplitData
from mmdd.data.transforms import normalize
from mmdd.evaluate.retrieval import retrieval_metrics


def backbone_batches(model, data: SplitData, mean, std, batch_size: int, device):
    """The backbone's features of a split's images, batch by batch (no grad; caller sets eval mode)."""
    for s in range(0, data.num_images, batch_size):
        idx = range(s, min(s + batch_size, data.num_images))
        yield model.features(normalize(data.image_batch(idx).to(device), mean, std))


def backbone_fingerprint(model) -> str:
    """Hash of the backbone's parameters and buffers: two frozen backbones share features only if this is equal
    (a loaded checkpoint gives every student the same one; a random initialisation gives each seed its own)."""
    h = hashlib.sha1()
    for name, t in sorted({**dict(model.backbone.named_parameters()), **dict(model.backbone.named_buffers())}.items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class BackboneFeatures:
    """Features of a frozen backbone for whole splits, computed once and reused by every student that
    stands on the same backbone (the K seeds of an evaluation, every evaluation point of each).

    Keyed by (backbone fingerprint, split, normalisation); only valid for a frozen, batch-independent
    backbone (`DualEncoder.backbone_is_cacheable`), and students do not augment, so reuse is exact.
    """

    def __init__(self, mean, std, batch_size: int = 256):
        self.mean, self.std, self.batch_size = list(mean), list(std), batch_size
        self._cache: dict[tuple, torch.Tensor] = {}
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # frozen: hashed once per model

    @torch.no_grad()
    def split(self, model, data: SplitData) -> torch.Tensor:
        if model not in self._fingerprints:
            self._fingerprints[model] = backbone_fingerprint(model)
        key = (self._fingerprints[model], data.split.name, data.num_images, tuple(self.mean), tuple(self.std))
        if key not in self._cache:
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            batches = backbone_batches(model, data, self.mean, self.std, self.batch_size, device)
            self._cache[key] = torch.cat([f.float().cpu() for f in batches])
            model.train(was_training)
        return self._cache[key]


@torch.no_grad()
def encode_split(model, data: SplitData, mean, std, batch_size: int = 256, device=None, features: BackboneFeatures | None = None):
    """Return (image_features [n_img, D], text_features [n_cap, D]) L2-normalised.

    With `features` (a frozen backbone's cache) only the image head runs on the cached backbone features.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    if features is not None:
        backbone = features.split(model, data).split(batch_size)
    else:
        backbone = backbone_batches(model, data, mean, std, batch_size, device)
    img = torch.cat([F.normalize(model.image_head(f.to(device)), dim=-1).float() for f in backbone])
    txt = torch.cat([model.encode_text(data.text_emb[s : s + batch_size].to(device)).float()
                     for s in range(0, data.text_emb.shape[0], batch_size)])
    model.train(was_training)
    return img, txt


def evaluate_retrieval(model, data: SplitData, mean, std, batch_size: int = 256,
                       features: BackboneFeatures | None = None) -> dict[str, float]:
    img, txt = encode_split(model, data, mean, std, batch_size, features=features)
    return retrieval_metrics((img @ txt.t()).cpu(), data.txt2img)
