"""Modality-collapse diagnostics on constructed embeddings with known values."""

import math

import pytest
import torch

from mmdd.evaluate.diagnostics import collapse_metrics, mean_offdiag_cosine, modality_gap


def test_intra_similarity_of_known_configurations():
    # identical embeddings: fully collapsed
    assert mean_offdiag_cosine(torch.ones(5, 3)) == pytest.approx(1.0)
    # orthonormal embeddings: no shared direction
    assert mean_offdiag_cosine(torch.eye(4)) == pytest.approx(0.0, abs=1e-7)
    # a regular simplex of N points: every pair at cosine -1/(N-1)
    n = 4
    simplex = torch.eye(n) - 1.0 / n
    assert mean_offdiag_cosine(simplex) == pytest.approx(-1 / (n - 1))
    # scale does not matter (cosine), and the N x N shortcut equals the explicit mean
    g = torch.Generator().manual_seed(0)
    e = torch.randn(7, 5, generator=g)
    n_e = torch.nn.functional.normalize(e, dim=-1)
    explicit = ((n_e @ n_e.t()).sum() - 7) / (7 * 6)
    assert mean_offdiag_cosine(3 * e) == pytest.approx(float(explicit), rel=1e-5)


def test_modality_gap_and_concentration_ratio():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[0.0, 2.0], [0.0, 5.0]])
    assert modality_gap(img, txt) == pytest.approx(math.sqrt(2))  # centroids (1, 0) and (0, 1)
    assert modality_gap(img, img) == pytest.approx(0.0)
    # a collapsed set (every embedding the same) is infinitely concentrated
    collapsed = collapse_metrics(img, txt, reference={"intra_image": 0.5, "intra_text": 0.25})
    assert collapsed["intra_image"] == pytest.approx(1.0) and collapsed["concentration_image"] == float("inf")
    # orthogonal set vs real data at cosine 0.5 / 0.75: mean cosine distances 1 vs 0.5 / 0.25
    m = collapse_metrics(torch.eye(3), torch.eye(3), reference={"intra_image": 0.5, "intra_text": 0.75})
    assert m["concentration_image"] == pytest.approx(0.5) and m["concentration_text"] == pytest.approx(0.25)
    # a set as spread as the real data scores 1
    assert collapse_metrics(torch.eye(3), torch.eye(3), reference={"intra_image": 0.0, "intra_text": 0.0})["concentration_text"] == pytest.approx(1.0)
    assert "concentration_image" not in collapse_metrics(img, txt)
