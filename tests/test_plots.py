"""Figures are real PNGs of the expected layout."""

import torch
from PIL import Image

from mmdd.report.plots import distillation_curves, pairs_grid, recall_vs_budget


def test_recall_vs_budget_png(tmp_path):
    rows = [{"dataset": "synscenes", "method": m, "budget": b, "mean": {"r_mean": v}, "std": {"r_mean": 0.5}}
            for m, base in (("lors", 4.0), ("random", 1.0)) for b, v in ((100, base), (200, base + 1))]
    rows.append({"dataset": "synscenes", "method": "full train (teachers)", "budget": 5000, "protocol": "teacher",
                 "mean": {"r_mean": 12.0}, "std": {"r_mean": 1.0}})  # drawn as a line, not a point at budget 5000
    png = recall_vs_budget(rows, tmp_path / "budget.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 150


def test_curves_and_pairs_grid(tmp_path):
    history = [{"iteration": float(i), "distill/matching_loss": 2 - i / 10, "distill/loss_image": 1.0,
                "distill/loss_text": 1 - i / 10, "distill/lr_image": 0.01 * i, "distill/lr_text": 0.02} for i in range(1, 6)]
    with Image.open(distillation_curves(history, tmp_path / "curves.png")) as im:
        assert im.format == "PNG" and im.width > im.height  # two panels side by side
    images = torch.randn(7, 3, 8, 8)
    png = pairs_grid(images, [f"caption {i} " * 5 for i in range(7)], [0.5] * 3, [0.25] * 3, tmp_path / "pairs.png", cols=4)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.height > 0
    assert not list(tmp_path.glob(".*.tmp"))
