"""How a run's numbers are made, said and kept: TF32, the precisions a distillation accepts, bf16 where it must not
round (the cached-feature gradient, S), the feature cache keyed by autocast, each rank's own random stream."""

import pytest
import torch
from omegaconf import OmegaConf

from conftest import toy_segment
from mmdd.errors import MmddError
from mmdd.evaluate.encode import BackboneFeatures
from mmdd.methods.engine.learned import check_distill_precision
from mmdd.methods.trajectory.meta_gradient import tesla, with_cached_features
from mmdd.models.convnet import ConvNet
from mmdd.models.dual_encoder import DualEncoder
from mmdd.models.losses import symmetric_infonce
from mmdd.synthetic.similarity import LowRankSimilarity
from mmdd.utils.seed import rank_seed, seed_rank_streams
from mmdd.utils.trainer import hardware_record, setup_process


def hw(**kw):
    return OmegaConf.create({"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32-true",
                             "deterministic": False, "tf32": False, **kw})


def test_tf32_is_one_setting_for_matmuls_and_convolutions_and_is_recorded():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        setup_process(hw(tf32=True))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        setup_process(hw(tf32=False))  # torch's own default has convolutions on: off means full fp32 throughout
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    record = hardware_record(hw(precision="bf16-mixed", deterministic=True))
    assert record["precision"] == "bf16-mixed" and record["deterministic"] is True and record["processes"] == 1
    assert record["tf32"] is None and record["cuda"] is None  # the CPU: no TF32 to speak of


@pytest.mark.parametrize("precision, says", [("16-mixed", "loss scale would never back off"),
                                             ("bf16-true", "rounding away most outer updates"),
                                             ("16-true", "rounding away most outer updates")])
def test_a_distillation_refuses_precisions_it_cannot_honour(precision, says):
    with pytest.raises(MmddError, match=says):
        check_distill_precision(precision)
    for fine in ("32-true", "64-true", "bf16-mixed", "bf16"):
        check_distill_precision(fine)


def test_bf16_autocast_keeps_s_low_rank_product_in_float32():
    s = LowRankSimilarity(6, rank=2, alpha=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s.right.normal_(generator=torch.Generator().manual_seed(1))
    exact = s.matrix()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = s.matrix()
    assert under.dtype == torch.float32 and torch.equal(under, exact)


def test_bf16_autocast_accumulates_the_cached_feature_gradient_in_float32():
    """Every inner step adds its gradient to the cached features' leaf: in bf16 the sum would keep 8 bits."""
    torch.manual_seed(0)
    bb = ConvNet(image_size=8, width=4, depth=2)
    m = DualEncoder(bb, bb.num_features, text_dim=5, embed_dim=6, image_head=True, trainable="heads")
    seen = {}

    def compute(seg, backward):
        seen["leaf"] = seg.images.dtype
        return tesla(seg, backward)

    from dataclasses import replace

    seg = toy_segment(m, 3, lambda logits, idx: symmetric_infonce(logits))  # float64: made float32 here
    leaf = lambda t: t.detach().float().requires_grad_(True)  # noqa: E731
    seg = replace(seg, images=leaf(seg.images), texts=leaf(seg.texts), lrs={k: leaf(v) for k, v in seg.lrs.items()},
                  start={k: v.float() for k, v in seg.start.items()}, target={k: v.float() for k, v in seg.target.items()})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_cached_features(compute)(seg, lambda t, inputs: t.backward(inputs=inputs))
    assert seen["leaf"] == torch.float32 and seg.images.grad is not None


def test_features_cached_under_autocast_are_not_served_to_a_float32_run(tmp_path):
    from mmdd.data.annotations import Split
    from mmdd.data.splits import SplitData

    torch.manual_seed(0)
    bb = ConvNet(image_size=8, width=4, depth=2)
    m = DualEncoder(bb, bb.num_features, text_dim=5, embed_dim=6, image_head=True, trainable="heads")
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = Split("test", [tmp_path / f"{i}.png" for i in range(6)], [f"c{i}" for i in range(6)], list(range(6)))
    data = SplitData(split=split, text_emb=torch.randn(6, 5), image_size=8, images=images, mean=[0.5] * 3,
                     std=[0.25] * 3)
    cache = BackboneFeatures(256, cache_dir=tmp_path)
    plain = cache.split(m, data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = cache.split(m, data)
    assert len(cache._cache) == 2 and not torch.equal(plain, rounded)
    assert torch.equal(BackboneFeatures(256, cache_dir=tmp_path).split(m, data), plain)


def test_each_rank_draws_its_own_dropout_masks_and_rank_0_those_of_one_process():
    torch.manual_seed(7)
    single = torch.rand(4)
    torch.manual_seed(7)
    seed_rank_streams(7, 0)
    assert torch.equal(torch.rand(4), single)
    torch.manual_seed(7)
    seed_rank_streams(7, 1)
    assert torch.initial_seed() == rank_seed(7, 1) and not torch.equal(torch.rand(4), single)
