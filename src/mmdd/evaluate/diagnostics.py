"""Modality-collapse diagnostics (the RepBlend paper's analysis, as numbers).

On L2-normalised embeddings of N images and N texts:
    intra_image    mean cosine similarity between distinct images (1 = all embeddings identical)
    intra_text     the same for texts
    modality_gap   ||mean(image embeddings) - mean(text embeddings)||_2 (Liang et al., 2022)
    concentration_{image,text}  (1 - intra of real pairs) / (1 - intra of the set), both embedded by the
                   same model: the real data's mean cosine distance over the set's. > 1: the set's embeddings
                   are more concentrated than real data's; infinite when the set has collapsed to one point.
                   (mmdd's definition: a ratio of similarities would divide by ~0 for text, whose real
                   intra-modal similarity is close to 0. The RepBlend paper's own "concentration ratio"
                   is defined in a footnote this project could not read offline.)
Collapse shows as intra similarities and the gap growing during distillation.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from mmdd.models.functional import ParamLayout


def mean_offdiag_cosine(emb: torch.Tensor) -> float:
    """Mean cosine similarity over the N(N-1) ordered pairs of distinct rows."""
    n = emb.shape[0]
    if n < 2:
        raise ValueError("intra-modal similarity needs at least 2 embeddings")
    e = F.normalize(emb.float(), dim=-1)
    total = e.sum(0).pow(2).sum() - e.pow(2).sum()  # sum_{i != j} <e_i, e_j> without the N x N matrix
    return float(total / (n * (n - 1)))


def modality_gap(img: torch.Tensor, txt: torch.Tensor) -> float:
    return float((F.normalize(img.float(), dim=-1).mean(0) - F.normalize(txt.float(), dim=-1).mean(0)).norm())


def collapse_metrics(img: torch.Tensor, txt: torch.Tensor, reference: dict[str, float] | None = None) -> dict[str, float]:
    """The diagnostics of one set of embeddings; `reference` (the same metrics on real pairs) adds the ratios."""
    out = {"intra_image": mean_offdiag_cosine(img), "intra_text": mean_offdiag_cosine(txt), "modality_gap": modality_gap(img, txt)}
    if reference:
        for m in ("image", "text"):
            spread = 1.0 - out[f"intra_{m}"]
            out[f"concentration_{m}"] = (1.0 - reference[f"intra_{m}"]) / spread if spread > 0 else float("inf")
    return out


class CollapseProbe:
    """Embeds the synthetic set with one fixed model (an expert's final parameters) so that values are
    comparable across iterations, and real pairs of the same size once as the reference."""

    def __init__(self, model, layout: ParamLayout, flats: dict[str, torch.Tensor], real_images, real_texts, batch: int):
        self.model = copy.deepcopy(model).eval()
        layout.load_into(self.model, flats)
        self.batch = batch
        self.reference = collapse_metrics(*self.embed(real_images, real_texts))

    @torch.no_grad()
    def embed(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        img = torch.cat([self.model.encode_image(images[i : i + self.batch].to(device)) for i in range(0, len(images), self.batch)])
        txt = torch.cat([self.model.encode_text(texts[i : i + self.batch].to(device)) for i in range(0, len(texts), self.batch)])
        return img, txt

    def to(self, device) -> "CollapseProbe":
        self.model.to(device)
        return self

    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, float]:
        return collapse_metrics(*self.embed(images.detach(), texts.detach()), reference=self.reference)
