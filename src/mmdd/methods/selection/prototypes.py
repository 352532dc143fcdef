"""PDS-style prototype selection: the learning-free first stage of PDS (prototype-guided data synthesis, ICLR 2026;
code junhyeok9712/PDS, pds_distill.py, read at 3a73f43), with real images where PDS generates them.

1. every (image, caption) annotation is embedded: the image by a teacher (expert 0 of the trajectory store at its
   last epoch), the caption as the students read it (its cached embedding) and by the teacher;
2. the `prune_ratio` (0.2) of pairs whose image and caption agree least (teacher cosine) are dropped;
3. k-means with K = budget, separately on the kept image embeddings and on the kept caption embeddings;
4. image clusters are matched one-to-one to caption clusters by the largest total co-occurrence (Hungarian);
5. each matched cell (i, j) gives a prototype pair: the mean image embedding and the mean caption embedding of the
   pairs in both clusters (the clusters' centres when no pair is in both).
The set's text is the caption prototype itself (as PDS: its students read the prototype embedding), or with
text=nearest the real caption nearest to it. PDS renders each image prototype with Stable unCLIP (prompted by the
nearest real caption); those weights cannot be fetched here, so the set takes the real image nearest to each image
prototype (distinct images), which PDS never does: mmdd's variant, hence "PDS-style". A generator is a hook
(`generator: {_target_: ...}`, see `PrototypeImageGenerator`); none ships with mmdd.

Where mmdd differs from PDS's code, and why: the embeddings are a teacher's and the student's caption encoder's
(PDS: CLIP ViT-L/14 for both, not available offline); k-means is exact Lloyd with k-means++ (PDS: sklearn
MiniBatchKMeans, batch 10000) seeded by the run's seed (PDS: 42 whatever the seed, so seeds would give one set); an
empty matched cell always falls back to the centres (PDS: only when K < 300, else NaN); the co-occurrence table is
K x K by cluster label (PDS indexes a table that shrinks when a cluster is empty).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from mmdd.errors import MmddError
from mmdd.evaluate.encode import encode_split
from mmdd.methods.base import DistillResult, Method
from mmdd.methods.context import MethodContext
from mmdd.config_schema import build_settings, check_fields
from mmdd.methods.selection.clustering import METRICS, cooccurrence, kmeans, match_clusters
from mmdd.synthetic.synthetic_set import SyntheticSet, nearest_captions

log = logging.getLogger(__name__)


@dataclass
class Prototypes:
    """K matched prototype pairs, in the order of the image clusters."""

    image: torch.Tensor  # [K, D_teacher] mean teacher image embedding of each cell
    text: torch.Tensor  # [K, D_caption] mean caption embedding (the students' input space)
    members: list[list[int]]  # the kept annotation rows (caption indices) of each cell; empty: centres were used
    pairs: list[tuple[int, int]]  # (image cluster, caption cluster) of each prototype


class PrototypeImageGenerator(Protocol):
    """Renders one image per prototype (PDS: Stable unCLIP from the image prototype, prompted by `prompts`).
    Returns uint8 [K, 3, image_size, image_size]."""

    def __call__(self, prototypes: Prototypes, prompts: list[str], image_size: int) -> torch.Tensor: ...


def prune_pairs(image_rows: torch.Tensor, text_rows: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the annotation rows kept after dropping the int(N * ratio) with the lowest image-text cosine
    (ties: the earlier row is kept)."""
    sim = (F.normalize(image_rows, dim=1) * F.normalize(text_rows, dim=1)).sum(1)
    n_drop = int(sim.shape[0] * ratio)
    order = torch.argsort(sim, descending=True, stable=True)
    return order[: sim.shape[0] - n_drop].sort().values


def match_prototypes(image_rows: torch.Tensor, caption_rows: torch.Tensor, k: int, generator: torch.Generator,
                     metric: str = "euclidean", iterations: int = 100, restarts: int = 1,
                     cluster_captions: torch.Tensor | None = None) -> Prototypes:
    """Steps 3-5 on kept rows: k-means of images and of captions, Hungarian matching, cell means. Captions are
    clustered on `cluster_captions` when given (e.g. teacher embeddings) and averaged in `caption_rows`."""
    km_img = kmeans(image_rows, k, generator, metric, iterations, restarts=restarts)
    clustered = caption_rows if cluster_captions is None else cluster_captions
    km_txt = kmeans(clustered, k, generator, metric, iterations, restarts=restarts)
    pairs = match_clusters(cooccurrence(km_img.labels, km_txt.labels, k))
    images, texts, members = [], [], []
    for i, j in pairs:
        cell = ((km_img.labels == i) & (km_txt.labels == j)).nonzero().flatten()
        members.append(cell.tolist())
        if len(cell):
            images.append(image_rows[cell].mean(0))
            texts.append(caption_rows[cell].mean(0))
        else:  # no pair in both: each cluster's own mean (an empty cluster, e.g. of duplicate rows: its centre)
            images.append(cluster_mean(image_rows, km_img, i))
            texts.append(cluster_mean(caption_rows, km_txt, j, clustered))
    return Prototypes(torch.stack(images), torch.stack(texts), members, pairs)


def cluster_mean(rows: torch.Tensor, km, c: int, clustered: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of cluster c's members in `rows`; for an empty cluster (k-means can end with one when rows repeat),
    its centre, or, when it was clustered in another space (`clustered`), the row nearest that centre there."""
    members = km.labels == c
    if members.any():
        return rows[members].mean(0)
    if clustered is None or clustered is rows:
        return km.centres[c].to(rows.dtype)
    return rows[int((clustered - km.centres[c]).norm(dim=1).argmin())]


def nearest_distinct(queries: torch.Tensor, candidates: torch.Tensor) -> list[int]:
    """For each query in turn, the candidate with the highest cosine not yet taken."""
    sim = F.normalize(queries, dim=1) @ F.normalize(candidates, dim=1).t()
    taken = torch.zeros(candidates.shape[0], dtype=torch.bool)
    out = []
    for row in sim:
        i = int(row.masked_fill(taken, float("-inf")).argmax())
        out.append(i)
        taken[i] = True
    return out


@dataclass(kw_only=True)
class PrototypeSettings:
    """conf/method/pds.yaml, minus `_target_`/`name`; each field's type is checked as every method's are."""

    lr: float  # the students' step size (nothing is learned)
    prune_ratio: float
    metric: Literal[METRICS]
    iterations: int
    restarts: int
    caption_space: Literal["input", "teacher"]
    text: Literal["prototype", "nearest"]
    generator: dict | None  # {_target_: ...} of a PrototypeImageGenerator, built when the set is made

    def __post_init__(self):
        check_fields(self, "method", "fix it in conf/method/pds.yaml or on the command line")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise MmddError(f"method.prune_ratio must be in [0, 1), got {self.prune_ratio}")


class PrototypeSelection(Method):
    """PDS-style selection (see the module doc); conf/method/pds.yaml."""

    settings_cls = PrototypeSettings

    def __init__(self, name: str, **settings):
        self.name = name
        self.settings = build_settings(self.settings_cls, settings, "method", f"conf/method/{name}.yaml (method={name})")

    def prototypes(self, context: MethodContext) -> tuple[Prototypes, torch.Tensor]:
        """The matched prototypes, and the teacher's embedding of every train image."""
        from mmdd.methods.selection.coresets import final_teacher

        train, budget = context.train, context.budget
        model, expert = final_teacher(context)
        self.teacher_experts = [expert]
        device = context.device  # the embeddings and the k-means: minutes at Flickr30K's size on a GPU
        image_emb, caption_emb = encode_split(model.to(device), train, context.hardware.inference_batch)
        txt2img = train.txt2img.to(device)
        c = self.settings
        kept = prune_pairs(image_emb[txt2img], caption_emb, c.prune_ratio)
        if kept.numel() < budget:
            raise MmddError(f"method.prune_ratio={c.prune_ratio} keeps {kept.numel()} pairs, fewer than budget={budget}")
        teacher_captions = caption_emb[kept] if c.caption_space == "teacher" else None
        protos = match_prototypes(image_emb[txt2img[kept]], train.text_emb.to(device)[kept], budget,
                                  torch.Generator().manual_seed(context.seed), c.metric, c.iterations, c.restarts,
                                  teacher_captions)
        kept = kept.cpu()
        protos.image, protos.text, image_emb = protos.image.cpu(), protos.text.cpu(), image_emb.cpu()
        protos.members = [[int(kept[r]) for r in cell] for cell in protos.members]
        empty = sum(not cell for cell in protos.members)
        log.info("PDS-style: kept %d of %d pairs; %d prototypes (%d from cluster centres: no pair in both clusters)",
                 kept.numel(), txt2img.numel(), budget, empty)
        return protos, image_emb

    def synthesize(self, context: MethodContext) -> DistillResult:
        train, budget, size = context.train, context.budget, context.model.image_size
        protos, image_emb = self.prototypes(context)
        prompts = nearest_captions(protos.text, train.text_emb, train.split.captions)
        if self.settings.generator:
            images = instantiate(self.settings.generator)(protos, prompts, size)
            want = (budget, 3, size, size)
            if tuple(images.shape) != want or images.dtype != torch.uint8:
                raise MmddError(f"method.generator returned {images.dtype} {tuple(images.shape)}, expected uint8 {want}")
        else:
            images = train.image_batch(nearest_distinct(protos.image, image_emb))
        if self.settings.text == "nearest":
            idx = nearest_distinct(protos.text, train.text_emb)
            texts = train.text_emb[idx].clone()
        else:
            texts = protos.text.clone()
        images = train.normalise(images)
        lr = self.settings.lr
        return DistillResult(SyntheticSet(images, texts, {"image": lr, "text": lr}),
                             teacher_experts=list(self.teacher_experts))
