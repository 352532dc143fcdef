"""Seeded k-means, the member nearest each centre, and one-to-one matching of two clusterings.

Shared by the learning-free selections (PDS-style prototypes) and the k-means initialisation of MDM. Everything is
deterministic given the (CPU) generator, runs on the rows' device, and works in chunks so that 145k x 4608 features (Flickr30K's captions in a
joint image-text space) never need an N x K x D tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmdd.errors import MmddError

METRICS = ("euclidean", "cosine")
CHUNK = 8192  # rows per distance block: N x K distances are built CHUNK rows at a time


def _prepare(x: torch.Tensor, metric: str) -> torch.Tensor:
    if metric not in METRICS:
        raise MmddError(f"k-means metric must be one of {METRICS}, got {metric!r}")
    x = x.float()
    return F.normalize(x, dim=1) if metric == "cosine" else x


def distances(x: torch.Tensor, centres: torch.Tensor, metric: str, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K]: squared euclidean distances, or cosine distances 1 - <x, c> (rows of x already unit for cosine);
    `x_sq`: the rows' squared norms [N, 1] when already known."""
    if metric == "cosine":
        return 1.0 - x @ F.normalize(centres, dim=1).t()
    x_sq = x.pow(2).sum(1, keepdim=True) if x_sq is None else x_sq
    return (x_sq - 2.0 * x @ centres.t() + centres.pow(2).sum(1)).clamp_min_(0.0)


def _assign(x: torch.Tensor, centres: torch.Tensor, metric: str, x_sq: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(label, distance to its centre) of every row, in chunks."""
    labels, dist = [], []
    for s in range(0, x.shape[0], CHUNK):
        d = distances(x[s:s + CHUNK], centres, metric, x_sq[s:s + CHUNK])
        m, i = d.min(1)
        labels.append(i)
        dist.append(m)
    return torch.cat(labels), torch.cat(dist)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator, metric: str,
                     x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability proportional to
    its distance to the nearest centre so far (squared euclidean, or cosine distance)."""
    n = x.shape[0]
    x_sq = x.pow(2).sum(1, keepdim=True) if x_sq is None else x_sq
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    nearest = distances(x, x[first:first + 1], metric, x_sq).squeeze(1)
    for _ in range(1, k):
        weights = nearest.clamp_min(0.0).double().cpu()  # drawn on the host: the generator is a CPU one
        if float(weights.sum()) <= 0.0:  # fewer distinct points than k: any row not yet a centre
            weights = torch.ones(n, dtype=torch.float64)
        i = int(torch.multinomial(weights, 1, generator=generator))
        centres.append(x[i])
        nearest = torch.minimum(nearest, distances(x, x[i:i + 1], metric, x_sq).squeeze(1))
    return torch.stack(centres)


@dataclass
class KMeansResult:
    centres: torch.Tensor  # [K, D] (unit rows for cosine)
    labels: torch.Tensor  # [N] long
    inertia: float  # sum of each row's distance to its centre
    iterations: int


SEEDINGS = ("plus_plus", "random")


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, metric: str = "euclidean", iterations: int = 100,
           tol: float = 1e-4, restarts: int = 1, seeding: str = "plus_plus") -> KMeansResult:
    """Lloyd's k-means seeded by k-means++ (`plus_plus`) or by k distinct rows drawn uniformly (`random`: what
    fast_pytorch_kmeans, MDM's k-means, does); the best of `restarts` runs (lowest inertia). Cosine k-means
    (spherical) clusters unit rows and keeps unit centres (the normalised mean of the members). A cluster left empty
    is re-seeded with the row farthest from its centre; with repeated rows one can still end empty (the last
    iteration's re-seed may land on a duplicate), which callers handle (prototypes.cluster_mean). Stops when no centre moves more than `tol` (relative to the data's scale)."""
    if seeding not in SEEDINGS:
        raise MmddError(f"k-means seeding must be one of {SEEDINGS}, got {seeding!r}")
    x = _prepare(x, metric)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise MmddError(f"k-means with k={k} on {n} rows: k must be between 1 and the number of rows")
    x_sq = x.pow(2).sum(1, keepdim=True)
    scale = float(x_sq.mean().sqrt()) or 1.0
    best: KMeansResult | None = None
    # Minutes at Flickr30K's size: a bar with rate and ETA (quiet when stderr is not a terminal).
    bar = tqdm(total=max(1, restarts), desc=f"k-means k={k}", unit="run", disable=None, leave=False)
    for _ in range(max(1, restarts)):
        if seeding == "random":
            centres = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
        else:
            centres = kmeans_plus_plus(x, k, generator, metric, x_sq)
        it = 0
        for it in range(1, iterations + 1):
            labels, dist = _assign(x, centres, metric, x_sq)
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k)
            new = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
            empty = (counts == 0).nonzero().flatten().tolist()
            if empty:
                taken = dist.clone()
                for c in empty:  # the worst-served rows become the empty clusters' centres
                    i = int(taken.argmax())
                    new[c] = x[i]
                    taken[i] = -1.0
            if metric == "cosine":
                new = F.normalize(new, dim=1)
            shift = float((new - centres).norm(dim=1).max())
            centres = new
            if shift <= tol * scale and not empty:
                break
        labels, dist = _assign(x, centres, metric, x_sq)
        result = KMeansResult(centres, labels, float(dist.sum()), it)
        if best is None or result.inertia < best.inertia:
            best = result
        bar.update()
    bar.close()
    return best


def nearest_members(x: torch.Tensor, result: KMeansResult, metric: str = "euclidean") -> list[int]:
    """One distinct row per cluster: the member nearest its centre; for a cluster with no member left (empty, or
    every member taken), the nearest row not yet chosen anywhere. Clusters are served in order."""
    x = _prepare(x, metric)
    chosen: list[int] = []
    taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for c in range(result.centres.shape[0]):
        d = distances(x, result.centres[c:c + 1], metric).squeeze(1)
        members = (result.labels == c) & ~taken
        d = torch.where(members, d, d + float("inf")) if members.any() else d.masked_fill(taken, float("inf"))
        i = int(d.argmin())
        chosen.append(i)
        taken[i] = True
    return chosen


def cooccurrence(labels_a: torch.Tensor, labels_b: torch.Tensor, k: int) -> torch.Tensor:
    """[k, k] counts: entry (i, j) = rows whose a-cluster is i and b-cluster is j (absent clusters keep rows of 0,
    so positions are the cluster labels)."""
    return torch.bincount(labels_a.long() * k + labels_b.long(), minlength=k * k).reshape(k, k)


def match_clusters(counts: torch.Tensor) -> list[tuple[int, int]]:
    """The one-to-one matching of a-clusters to b-clusters with the largest total co-occurrence (Hungarian
    algorithm), as (a, b) pairs ordered by a."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(counts.double().cpu().numpy(), maximize=True)
    return [(int(a), int(b)) for a, b in zip(rows, cols)]
