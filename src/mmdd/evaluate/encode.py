"""Encode a split with a dual encoder and score retrieval."""

from __future__ import annotations

import torch

from mmdd.data.datamodule import SplitData
from mmdd.data.transforms import normalize
from mmdd.evaluate.retrieval import retrieval_metrics


class BackboneFeatures:
    """Features of a frozen backbone for whole splits, computed once and reused by every student that
    stands on the same backbone (the K seeds of an evaluation, every evaluation point of each).

    Keyed by (backbone checkpoint, split, normalisation); only valid for a frozen, batch-independent
    backbone (`DualEncoder.backbone_is_cacheable`), and students do not augment, so reuse is exact.
    """

    def __init__(self, checkpoint: str | None, mean, std, batch_size: int = 256):
        self.checkpoint, self.mean, self.std, self.batch_size = checkpoint, list(mean), list(std), batch_size
        self._cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def split(self, model, data: SplitData) -> torch.Tensor:
        key = (self.checkpoint, data.split.name, data.num_images, tuple(self.mean), tuple(self.std))
        if key not in self._cache:
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            feats = []
            for s in range(0, data.num_images, self.batch_size):
                idx = range(s, min(s + self.batch_size, data.num_images))
                feats.append(model.backbone(normalize(data.image_batch(idx).to(device), self.mean, self.std)).float().cpu())
            model.train(was_training)
            self._cache[key] = torch.cat(feats)
        return self._cache[key]


@torch.no_grad()
def encode_split(model, data: SplitData, mean, std, batch_size: int = 256, device=None, features: BackboneFeatures | None = None):
    """Return (image_features [n_img, D], text_features [n_cap, D]) L2-normalised.

    With `features` (a frozen backbone's cache) only the image head runs on the cached backbone features.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    img_feats = []
    cached = features.split(model, data) if features is not None else None
    for s in range(0, data.num_images, batch_size):
        idx = range(s, min(s + batch_size, data.num_images))
        if cached is not None:
            img_feats.append(torch.nn.functional.normalize(model.image_head(cached[s : s + batch_size].to(device)), dim=-1).float())
            continue
        x = normalize(data.image_batch(idx).to(device), mean, std)
        img_feats.append(model.encode_image(x).float())
    txt_feats = []
    for s in range(0, data.text_emb.shape[0], batch_size):
        txt_feats.append(model.encode_text(data.text_emb[s : s + batch_size].to(device)).float())
    model.train(was_training)
    return torch.cat(img_feats), torch.cat(txt_feats)


def evaluate_retrieval(model, data: SplitData, mean, std, batch_size: int = 256,
                       features: BackboneFeatures | None = None) -> dict[str, float]:
    img, txt = encode_split(model, data, mean, std, batch_size, features=features)
    return retrieval_metrics((img @ txt.t()).cpu(), data.txt2img)
