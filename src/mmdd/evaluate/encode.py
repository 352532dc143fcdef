"""Encode a split with a dual encoder and score retrieval."""

from __future__ import annotations

import torch

from mmdd.data.datamodule import SplitData
from mmdd.data.transforms import normalize
from mmdd.evaluate.retrieval import retrieval_metrics


@torch.no_grad()
def encode_split(model, data: SplitData, mean, std, batch_size: int = 256, device=None):
    """Return (image_features [n_img, D], text_features [n_cap, D]) L2-normalised."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    img_feats = []
    for s in range(0, data.num_images, batch_size):
        idx = range(s, min(s + batch_size, data.num_images))
        x = normalize(data.image_batch(idx).to(device), mean, std)
        img_feats.append(model.encode_image(x).float())
    txt_feats = []
    for s in range(0, data.text_emb.shape[0], batch_size):
        txt_feats.append(model.encode_text(data.text_emb[s : s + batch_size].to(device)).float())
    model.train(was_training)
    return torch.cat(img_feats), torch.cat(txt_feats)


def evaluate_retrieval(model, data: SplitData, mean, std, batch_size: int = 256) -> dict[str, float]:
    img, txt = encode_split(model, data, mean, std, batch_size)
    return retrieval_metrics((img @ txt.t()).cpu(), data.txt2img)
