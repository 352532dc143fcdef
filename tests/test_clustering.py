"""Seeded k-means, members and one-to-one matching (mmdd.methods.selection.clustering)."""

from __future__ import annotations

import torch

from mmdd.methods.selection.clustering import cooccurrence, kmeans, match_clusters, nearest_members


def blobs(centres, n=20, spread=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = torch.tensor(centres)
    return (c.repeat_interleave(n, 0) + spread * torch.randn(len(centres) * n, c.shape[1], generator=gen)), n


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    x, n = blobs([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    res = kmeans(x, 3, torch.Generator().manual_seed(0), "euclidean", restarts=3)
    groups = [set(res.labels[i * n:(i + 1) * n].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    for i in range(3):  # centres are the blobs' means
        assert torch.allclose(res.centres[int(res.labels[i * n])], x[i * n:(i + 1) * n].mean(0), atol=1e-5)
    again = kmeans(x, 3, torch.Generator().manual_seed(0), "euclidean", restarts=3)
    assert torch.equal(res.labels, again.labels)
    medoids = nearest_members(x, res)
    for c, i in enumerate(medoids):
        members = (res.labels == c).nonzero().flatten()
        assert i == int(members[(x[members] - res.centres[c]).norm(dim=1).argmin()])


def test_cosine_kmeans_clusters_directions_not_lengths():
    x = torch.tensor([[1.0, 0.1], [10.0, 0.5], [0.1, 1.0], [0.4, 8.0]])
    res = kmeans(x, 2, torch.Generator().manual_seed(0), "cosine")
    assert res.labels[0] == res.labels[1] != res.labels[2] == res.labels[3]
    assert torch.allclose(res.centres.norm(dim=1), torch.ones(2))


def test_kmeans_with_more_clusters_than_distinct_rows_still_picks_distinct_members():
    x = torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 3)
    res = kmeans(x, 4, torch.Generator().manual_seed(0))
    picked = nearest_members(x, res)
    assert len(set(picked)) == 4


def test_cooccurrence_and_hungarian_by_hand():
    a = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    b = torch.tensor([2, 2, 1, 1, 0, 0, 0, 1])
    counts = cooccurrence(a, b, 3)
    assert counts.tolist() == [[0, 1, 2], [1, 1, 0], [2, 1, 0]]
    # the one-to-one matching with the largest total: 0->2, 1->1, 2->0 (2 + 1 + 2); and where a greedy pick of
    # each row's best fails: [[3, 2], [2, 0]] greedy 0->0, 1->1 = 3, optimum 0->1, 1->0 = 4
    assert match_clusters(counts) == [(0, 2), (1, 1), (2, 0)]
    assert match_clusters(torch.tensor([[3, 2], [2, 0]])) == [(0, 1), (1, 0)]
    assert cooccurrence(torch.tensor([0, 0]), torch.tensor([1, 1]), 3).shape == (3, 3)  # absent clusters keep rows


def test_random_seeding_starts_from_distinct_rows_drawn_uniformly():
    """seeding=random (fast_pytorch_kmeans, MDM's): the first centres are k distinct rows of a uniform permutation of
    the run's generator; with no Lloyd step they are returned as they are."""
    import pytest

    from mmdd.errors import MmddError

    x, n = blobs([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    res = kmeans(x, 3, torch.Generator().manual_seed(7), "euclidean", iterations=0, seeding="random")
    rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(7))[:3]
    assert torch.equal(res.centres, x[rows])
    full = kmeans(x, 3, torch.Generator().manual_seed(7), "euclidean", restarts=5, seeding="random")
    assert len(set(full.labels.tolist())) == 3
    with pytest.raises(MmddError, match="seeding must be one of"):
        kmeans(x, 3, torch.Generator().manual_seed(7), seeding="forgy")
