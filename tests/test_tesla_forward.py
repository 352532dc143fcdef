"""TESLA's second pass in forward mode (method.tesla_pass2=forward) against the double-backward product, in float64:
the data's, the step sizes' and S's gradients agree to 1e-10 on every kind of model the methods distil with."""

from dataclasses import replace

import pytest
import torch

from conftest import toy_segment
from mmdd.methods.trajectory.meta_gradient import directional_step, tesla
from mmdd.methods.trajectory.unrolling import Blend
from mmdd.models.convnet import ConvNet
from mmdd.models.dual_encoder import DualEncoder
from mmdd.models.losses import symmetric_infonce, weighted_bce
from mmdd.synthetic.similarity import LowRankSimilarity


def convnet(dropout: float = 0.0, trainable: str = "backbone_and_heads", image_head: bool = False):
    torch.manual_seed(0)
    bb = ConvNet(image_size=8, width=3, depth=2)
    return DualEncoder(bb, bb.num_features, text_dim=5, dropout=dropout, image_head=image_head,
                       trainable=trainable).double()


def lors_segment(model, steps=3, **kw):
    """LoRS: weighted BCE against a learned low-rank S (S is matched data too)."""
    sim = LowRankSimilarity(4, 2, 1.0, torch.Generator().manual_seed(2)).double()
    return toy_segment(model, steps, lambda logits, idx: weighted_bce(logits, sim.matrix(idx)), extra=sim.parameters(),
                       **kw)


CASES = {
    # MTT-VL/TESLA-VL: every parameter trains (ConvNet + text head), InfoNCE
    "convnet_infonce": lambda: toy_segment(convnet(), 3, lambda logits, idx: symmetric_infonce(logits)),
    # LoRS with the heads' dropout on: pass 2 replays pass 1's masks in both products
    "convnet_lors_dropout": lambda: lors_segment(convnet(dropout=0.3).train()),
    # RepBlend: frozen backbone, trainable heads, blended features
    "heads_repblend": lambda: lors_segment(convnet(trainable="heads", image_head=True),
                                           blend=Blend(1.0, torch.Generator().manual_seed(4))),
}


def gradients(seg, pass2: str, seed: int = 123):
    seg = replace(seg, pass2=pass2)
    torch.manual_seed(seed)  # the dropout masks' stream
    loss, _ = tesla(seg, lambda t, inputs: t.backward(inputs=inputs))
    return [loss, seg.images.grad, seg.texts.grad, *(lr.grad for lr in seg.lrs.values()), *(p.grad for p in seg.extra)]


def assert_equal_to(a, b, rel: float) -> None:
    """Each gradient within `rel` of the largest entry of the reference's (a tensor whose gradient is zero, e.g. one
    factor of a low-rank S at its zero start, must be zero in both)."""
    assert float(b[1].abs().max()) > 0  # the images get a gradient
    for x, y in zip(a, b):
        scale = float(y.abs().max())
        assert float((x - y).abs().max()) <= rel * scale, (float((x - y).abs().max()), scale)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_mode_pass_2_equals_double_backward(case):
    forward, double = gradients(CASES[case](), "forward"), gradients(CASES[case](), "double_backward")
    assert_equal_to(forward, double, rel=1e-10)


def test_the_directional_derivative_is_the_contraction_with_the_gradient():
    """<direction, g> from one forward-mode pass equals the gradient contracted with the direction, and the g it
    returns is the gradient itself."""
    seg = CASES["convnet_infonce"]()
    idx = seg.schedule.next()
    g = torch.Generator().manual_seed(9)
    direction = {m: torch.randn(seg.start[m].shape, generator=g, dtype=torch.float64) for m in seg.start}
    product, grads = directional_step(seg, seg.start, idx, None, direction, with_grads=True)
    from mmdd.models.functional import functional_logits

    leaf = {m: seg.start[m].detach().clone().requires_grad_(True) for m in seg.start}
    loss = symmetric_infonce(functional_logits(seg.model, seg.layout, leaf, seg.images[idx], seg.texts[idx]))
    want = dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values()))))
    assert float(product) == pytest.approx(sum(float((direction[m] * want[m]).sum()) for m in want), rel=1e-12)
    for m in want:
        got = torch.cat([g.reshape(-1) for g in grads[m]])  # per-parameter tensors in the layout's order
        assert float((got - want[m]).abs().max()) <= 1e-12 * float(want[m].abs().max())


@pytest.mark.slow  # nfnet_l0 in float64 on the CPU: ~1 min
def test_forward_mode_pass_2_equals_double_backward_on_nfnet():
    """The papers' image encoder (timm nfnet_l0: scaled weight standardisation, SiLU, squeeze-excite), trainable,
    with LoRS's loss: the forward-mode formulas of its ops are differentiable too."""
    from mmdd.models.image_encoder import build_image_backbone

    torch.manual_seed(0)
    bb, dim = build_image_backbone("nfnet_l0", image_size=8, pretrained=False)
    model = DualEncoder(bb, dim, text_dim=5).double()

    def seg():
        return lors_segment(model, steps=2)

    assert_equal_to(gradients(seg(), "forward"), gradients(seg(), "double_backward"), rel=1e-10)


def _norm_input(W, X):  # an activation [3, 4, 2, 2] whose spatial statistics depend on the data and the parameters
    x, pattern = X.view(3, 4, 1, 1), torch.arange(4.0, dtype=torch.float64).view(1, 1, 2, 2)
    return x * W[:, :1].view(1, 4, 1, 1) * pattern + x.pow(2) * pattern.pow(2) * W[:, 3:4].view(1, 4, 1, 1)


OPS = {
    "group_norm": lambda W, X: torch.nn.functional.group_norm(_norm_input(W, X), 2, W[:, 1], W[:, 2]).pow(3).sum(),
    "instance_norm": lambda W, X: torch.nn.functional.instance_norm(_norm_input(W, X), weight=W[:, 1]).pow(3).sum(),
    "layer_norm": lambda W, X: torch.nn.functional.layer_norm(X @ W, (5,), W[0], W[1]).pow(3).sum(),
    "batch_norm": lambda W, X: torch.nn.functional.batch_norm(X @ W, None, None, W[0], W[1], training=True).pow(3).sum(),
    "log_softmax": lambda W, X: torch.nn.functional.log_softmax(X @ W, 1)[:, 0].sum(),
    "softmax": lambda W, X: (torch.softmax(X @ W, 1) * torch.arange(5.0, dtype=torch.float64)).sum(),
    "logsumexp": lambda W, X: torch.logsumexp(X @ W, 1).sum(),
    "cross_entropy": lambda W, X: torch.nn.functional.cross_entropy((X @ W)[:, :3].t(), torch.arange(3)),
}


@pytest.mark.parametrize("op", list(OPS))
def test_each_composed_op_is_the_fused_one_and_its_tangent_differentiates_exactly(op):
    """Under ComposedForForwardMode: the same value as PyTorch's fused op, and the gradient to the data of its
    directional derivative along a parameter direction equals double backward's (the fused ops' is wrong or raises)."""
    import torch.autograd.forward_ad as fwAD

    from mmdd.models.forward_mode import ComposedForForwardMode

    g = torch.Generator().manual_seed(0)
    W, c = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    X = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    f = OPS[op]
    Wl = W.clone().requires_grad_(True)
    (grad_w,) = torch.autograd.grad(f(Wl, X), Wl, create_graph=True)
    (want,) = torch.autograd.grad((grad_w * c).sum(), X)
    with fwAD.dual_level(), ComposedForForwardMode():
        value, tangent = fwAD.unpack_dual(f(fwAD.make_dual(W, c), X))
    (got,) = torch.autograd.grad(tangent, X)
    assert float(value) == pytest.approx(float(f(W, X)), rel=1e-12)
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_a_distillation_records_its_product_and_resumes_across_products(root):
    """`mmdd distill method=lors method.tesla_pass2=forward` on the tiny store: the manifest says how pass 2 was
    computed, the set is the double-backward run's up to float32 rounding, and a checkpoint made with one product
    resumes with the other (the product is not part of the distillation's identity)."""
    from helpers import distill_here, manifest, the_set

    lors = ["method=lors", "method.syn_steps=2", "method.iterations=2", "save_every=1"]
    distill_here(root, "pass2_forward", *lors, "method.tesla_pass2=forward")
    distill_here(root, "pass2_double", *lors)
    assert manifest(root, "pass2_forward")["computed_with"] == {"meta_gradient": "tesla", "tesla_pass2": "forward"}
    assert manifest(root, "pass2_double")["computed_with"]["tesla_pass2"] == "double_backward"
    forward, double = the_set(root, "pass2_forward"), the_set(root, "pass2_double")
    for k in double:
        assert torch.allclose(forward[k], double[k], rtol=1e-4, atol=1e-6), k
    distill_here(root, "pass2_double", *lors[:-2], "method.iterations=3", "method.tesla_pass2=forward")
    m = manifest(root, "pass2_double")
    assert m["iteration"] == 3 and m["resumed"][0]["iteration"] == 2


def test_composed_ops_compute_half_precision_inputs_in_float32_as_autocast_does():
    from mmdd.models.forward_mode import ComposedForForwardMode

    x = torch.randn(3, 5).to(torch.bfloat16)
    with ComposedForForwardMode():
        out = torch.nn.functional.log_softmax(x, 1), torch.nn.functional.layer_norm(x, (5,))
    assert all(o.dtype == torch.float32 for o in out)
    assert torch.allclose(out[0], torch.nn.functional.log_softmax(x.float(), 1), atol=1e-6)
