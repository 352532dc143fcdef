"""RepBlend: blending before the heads, replayed identically by TESLA; heads-only matching."""

import pytest
import torch
import torch.nn.functional as F

from conftest import toy_segment
from helpers import method_values
from mmdd.methods.trajectory.unrolling import Blend
from mmdd.models.functional import ParamLayout
from mmdd.methods.trajectory.meta_gradient import full_unroll, tesla, with_cached_features
from mmdd.models.convnet import ConvNet
from mmdd.models.dual_encoder import DualEncoder
from mmdd.models.losses import weighted_bce
from mmdd.synthetic.similarity import LowRankSimilarity


def heads_model(seed=0):
    torch.manual_seed(seed)
    bb = ConvNet(image_size=8, width=3, depth=1)
    return DualEncoder(bb, bb.num_features, text_dim=5, embed_dim=6, image_head=True, trainable="heads").double()


def test_blend_mixes_features_and_texts_with_one_permutation():
    m = heads_model().eval()
    images = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    texts = torch.randn(4, 5, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    lam = torch.tensor(0.3, dtype=torch.float64)
    feats = m.backbone(images)
    img = F.normalize(m.image_head(lam * feats + (1 - lam) * feats[perm]), dim=-1)
    txt = F.normalize(m.text_head(lam * texts + (1 - lam) * texts[perm]), dim=-1)
    expected = img @ txt.t() / 0.07
    assert torch.allclose(m(images, texts, mix=(lam, perm)), expected, atol=1e-10)
    assert torch.allclose(m(images, texts, mix=(torch.tensor(1.0, dtype=torch.float64), perm)), m(images, texts))


def test_blend_draws_are_reproducible_and_beta_distributed():
    a = Blend(1.0, torch.Generator().manual_seed(0))
    b = Blend(1.0, torch.Generator().manual_seed(0))
    for _ in range(3):
        (la, pa), (lb, pb) = a.draw(5), b.draw(5)
        assert la.item() == lb.item() and torch.equal(pa, pb) and sorted(pa.tolist()) == [0, 1, 2, 3, 4]
    lams = torch.stack([Blend(1.0, torch.Generator().manual_seed(s)).draw(2)[0] for s in range(400)])
    assert 0.45 < lams.mean().item() < 0.55 and lams.min() >= 0 and lams.max() <= 1  # Beta(1,1) = U(0,1)
    with pytest.raises(ValueError):
        Blend(0.0)


def test_heads_only_layout_matches_heads():
    lay = ParamLayout.from_model(heads_model())
    assert all(n.startswith("image_head.") for n in lay.names["image"])
    assert all(n.startswith("text_head.") for n in lay.names["text"])


def test_repblend_refuses_a_model_whose_backbone_trains():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from mmdd.errors import MmddError
    from mmdd.paths import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        method = instantiate(compose("distill", overrides=["method=repblend"]).method)
    method.prepare_model(heads_model())  # frozen backbone + heads: fine
    torch.manual_seed(0)
    bb = ConvNet(image_size=8, width=3, depth=1)
    with pytest.raises(MmddError, match="model=convnet_heads"):
        method.prepare_model(DualEncoder(bb, bb.num_features, text_dim=5))


def segment(steps):
    sim = LowRankSimilarity(4, 2, 1.0, torch.Generator().manual_seed(2)).double()
    return toy_segment(heads_model(), steps, lambda logits, idx: weighted_bce(logits, sim.matrix(idx)),
                       extra=sim.parameters(), blend=Blend(1.0, torch.Generator().manual_seed(4)))


def test_tesla_replays_the_blend_of_its_first_pass():
    """With one step TESLA is exact: equal gradients prove the second pass used the same (lam, perm)."""
    grads = []
    for strategy in (full_unroll, tesla):
        seg = segment(1)
        strategy(seg, lambda t, inputs: t.backward(inputs=inputs))
        grads.append([seg.images.grad, seg.texts.grad, *(p.grad for p in seg.extra)])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)
    assert grads[0][0].abs().sum() > 0  # pixels get gradient through the frozen backbone


@pytest.mark.parametrize("strategy", [full_unroll, tesla], ids=["full", "tesla"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_cached_backbone_features_give_the_same_gradients(strategy, chunk):
    """Backbone once per iteration (+ one backward to the pixels) == backbone at every inner step."""
    grads = []
    for run in (strategy, with_cached_features(strategy, chunk)):
        seg = segment(3)
        loss, _ = run(seg, lambda t, inputs: t.backward(inputs=inputs))
        grads.append([loss, seg.images.grad, seg.texts.grad, *(lr.grad for lr in seg.lrs.values()), *(p.grad for p in seg.extra)])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert grads[1][1].abs().sum() > 0


def test_only_frozen_batch_independent_backbones_are_cached():
    assert heads_model().backbone_is_cacheable()
    torch.manual_seed(0)
    bb = ConvNet(image_size=8, width=3, depth=1)
    assert not DualEncoder(bb, bb.num_features, text_dim=5).backbone_is_cacheable()  # backbone trains
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with_bn = DualEncoder(bn, 4, text_dim=5, image_head=True, trainable="heads")
    assert not with_bn.backbone_is_cacheable()  # batch statistics: features depend on the batch
    assert with_bn.eval().backbone_is_cacheable()


def test_tesla_replays_dropout_masks():
    """Dropout in the heads (the papers' models have 0.1): pass 2 must see pass 1's masks, or its gradients
    belong to other networks than the ones whose steps were summed (a bug of the reference code)."""
    grads = []
    for strategy in (full_unroll, tesla):
        seg = segment(1)
        for mod in seg.model.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.5
        seg.model.train()
        torch.manual_seed(123)
        strategy(seg, lambda t, inputs: t.backward(inputs=inputs))
        grads.append([seg.images.grad, seg.texts.grad, *(p.grad for p in seg.extra)])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)


def test_method_temperature_sets_the_distillation_models_logit_scale_only():
    from mmdd.errors import MmddError
    from mmdd.methods.trajectory.objective import TrajectoryMatching

    settings = method_values("mtt_vl")
    model = heads_model()
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    TrajectoryMatching("lors", **{**settings, "temperature": 0.1}).prepare_model(model)
    assert model.logit_scale.exp().item() == pytest.approx(10.0)
    with pytest.raises(MmddError, match="method.temperature"):
        TrajectoryMatching("lors", **{**settings, "temperature": 0})


@pytest.mark.parametrize("strategy", [full_unroll, tesla], ids=["full", "tesla"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_cached_features_encode_only_the_images_the_steps_touch(strategy, chunk):
    """12 images, 2 steps of batches of 3 (with blending and S): the backbone sees at most 6 images, the gradients
    equal the per-step path's (untouched images get zero gradient in both), and the draws are the same."""
    def seg():
        sim = LowRankSimilarity(12, rank=2, alpha=1.0, generator=torch.Generator().manual_seed(2)).double()
        blend = Blend(1.0, torch.Generator().manual_seed(9))
        s = toy_segment(heads_model(seed=1), 2, lambda logits, idx: weighted_bce(logits, torch.sigmoid(sim.matrix(idx))),
                        extra=tuple(sim.parameters()), blend=blend, n=12, batch=3)
        return s, blend.generator

    results = []
    for cached in (False, True):
        s, draws = seg()
        seen = []
        s.model.backbone.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
        run = with_cached_features(strategy, chunk) if cached else strategy
        loss, _ = run(s, lambda t, inputs: t.backward(inputs=inputs))
        results.append((loss, s.images.grad, s.texts.grad, *(p.grad for p in s.extra),
                        torch.cat([draws.get_state(), s.schedule.generator.get_state()])))
        if cached:
            assert sum(seen) <= 6 * (2 if chunk else 1)  # touched images only (chunked: encoded twice)
    (plain, cached) = results
    for a, b in zip(plain[:-1], cached[:-1]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    untouched = cached[1].flatten(1).abs().sum(1) == 0
    assert 6 <= int(untouched.sum()) < 12  # some images were not used, and got no gradient
    assert torch.equal(plain[-1], cached[-1])  # the generators advanced exactly as in the per-step path
