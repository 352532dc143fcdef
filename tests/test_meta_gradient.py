"""TESLA against the full unroll and against a plain implementation of its formula."""

import pytest
import torch

from mmdd.methods.trajectory.unrolling import BatchSchedule, matching_loss
from mmdd.models.functional import functional_logits
from mmdd.methods.trajectory.meta_gradient import Segment, full_unroll, tesla
from mmdd.models.losses import symmetric_infonce
from test_matching import setup


def segment(steps, batch, merged=False, seed=0):
    m, lay, start, target, images, texts = setup(seed, n=4)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    lrs = {k: torch.tensor(0.4 if k == "image" else 0.3, dtype=torch.float64, requires_grad=True) for k in start}
    return Segment(m, lay, start, target, lrs, images, texts, BatchSchedule(4, batch, torch.Generator().manual_seed(5)),
                   steps, lambda logits, idx: symmetric_infonce(logits), merged)


def run(strategy, seg):
    def backward(t, inputs):
        t.backward(inputs=inputs)

    loss, _ = strategy(seg, backward)
    return loss, seg.images.grad.clone(), seg.texts.grad.clone(), {k: v.grad.clone() for k, v in seg.lrs.items()}


@pytest.mark.parametrize("merged", [False, True])
def test_tesla_equals_full_unroll_for_one_step(merged):
    """(Under merged, with the step sizes' gradient of the merged loss too: tesla_lr_loss=as_loss.)"""
    from dataclasses import replace

    lf, gi_f, gt_f, gl_f = run(full_unroll, segment(1, 2, merged))
    lt, gi_t, gt_t, gl_t = run(tesla, replace(segment(1, 2, merged), lr_merged=merged))
    assert lt.item() == pytest.approx(lf.item(), rel=1e-12)
    assert torch.allclose(gi_t, gi_f, rtol=1e-9, atol=1e-14)
    assert torch.allclose(gt_t, gt_f, rtol=1e-9, atol=1e-14)
    for k in gl_f:
        assert gl_t[k].item() == pytest.approx(gl_f[k].item(), rel=1e-9)


def test_tesla_matches_its_formula_for_several_steps():
    """Per step: grad_X of 2*<lr*(theta*_target - theta_0) + lr^2*G, g_i>/D; lr: of ||theta_0 - lr*G - theta*||^2/D."""
    steps = 3
    seg = segment(steps, 2)
    loss, gi, gt, gl = run(tesla, seg)

    ref = segment(steps, 2)
    mods = list(ref.start)
    params = {m: ref.start[m].clone() for m in mods}
    gs, batches = [], []
    for _ in range(steps):  # plain SGD to get G and the batches
        idx = ref.schedule.next()
        batches.append(idx)
        p = {m: params[m].clone().requires_grad_(True) for m in mods}
        g = torch.autograd.grad(symmetric_infonce(functional_logits(ref.model, ref.layout, p, ref.images[idx].detach(),
                                                                    ref.texts[idx].detach())), [p[m] for m in mods])
        gs.append(dict(zip(mods, g)))
        params = {m: params[m] - ref.lrs[m].detach() * gs[-1][m] for m in mods}
    G = {m: sum(g[m] for g in gs) for m in mods}
    D = {m: (ref.start[m] - ref.target[m]).pow(2).sum() for m in mods}
    lr = {m: ref.lrs[m].detach() for m in mods}
    gi_ref = torch.zeros_like(ref.images)
    gt_ref = torch.zeros_like(ref.texts)
    params = {m: ref.start[m].clone() for m in mods}
    for i, idx in enumerate(batches):
        p = {m: params[m].clone().requires_grad_(True) for m in mods}
        g = torch.autograd.grad(symmetric_infonce(functional_logits(ref.model, ref.layout, p, ref.images[idx], ref.texts[idx])),
                                [p[m] for m in mods], create_graph=True)
        s = sum(2 * ((lr[m] * (ref.target[m] - ref.start[m]) + lr[m] ** 2 * G[m]) * gm).sum() / D[m] for m, gm in zip(mods, g))
        a, b = torch.autograd.grad(s, [ref.images, ref.texts])
        gi_ref += a
        gt_ref += b
        params = {m: params[m] - lr[m] * gs[i][m] for m in mods}
    assert torch.allclose(gi, gi_ref, rtol=1e-8, atol=1e-14)
    assert torch.allclose(gt, gt_ref, rtol=1e-8, atol=1e-14)
    for m in mods:
        lrv = ref.lrs[m].detach().clone().requires_grad_(True)
        val = (ref.start[m] - lrv * G[m] - ref.target[m]).pow(2).sum() / D[m]
        assert gl[m].item() == pytest.approx(torch.autograd.grad(val, lrv)[0].item(), rel=1e-9)
    full_final = {m: ref.start[m] - lr[m] * G[m] for m in mods}
    assert loss.item() == pytest.approx(matching_loss(full_final, ref.start, ref.target)[0].item(), rel=1e-10)


def test_tesla_points_the_same_way_as_full_unroll_for_several_steps():
    """An approximation, but a useful one: clearly positive cosine with the exact gradient."""
    _, gi_f, gt_f, _ = run(full_unroll, segment(4, 2))
    _, gi_t, gt_t, _ = run(tesla, segment(4, 2))
    cos = torch.nn.functional.cosine_similarity(torch.cat([gi_f.flatten(), gt_f.flatten()]),
                                                torch.cat([gi_t.flatten(), gt_t.flatten()]), dim=0)
    assert cos > 0.5


def test_tesla_step_size_gradient_is_per_modality_under_the_merged_loss_as_in_the_reference():
    """LoRS distill_tesla_lors.py (and RepBlend): with --merge_loss_branches the data gradients follow the merged loss,
    but lr_m's gradient is that of ||theta_0 - lr_m G_m - theta*_m||^2 / D_m, its own modality's term."""
    from dataclasses import replace

    seg = segment(3, 2, merged=True)
    _, gi, gt, gl = run(tesla, seg)
    as_loss = replace(segment(3, 2, merged=True), lr_merged=True)
    _, gi_a, gt_a, gl_a = run(tesla, as_loss)
    assert torch.equal(gi, gi_a) and torch.equal(gt, gt_a)  # the data gradients do not change

    # G_m: the sum of the inner gradients of a plain replay of pass 1 (same batches)
    ref = segment(3, 2, merged=True)
    params = {m: ref.start[m].detach().clone() for m in ref.start}
    grad_sum = {m: torch.zeros_like(params[m]) for m in params}
    for _ in range(3):
        idx = ref.schedule.next()
        leaf = {m: p.requires_grad_(True) for m, p in params.items()}
        logits = functional_logits(ref.model, ref.layout, leaf, ref.images[idx].detach(), ref.texts[idx].detach())
        grads = torch.autograd.grad(ref.inner_loss(logits, idx), [leaf[m] for m in leaf])
        for m, g in zip(list(leaf), grads):
            grad_sum[m] += g
            params[m] = (params[m] - ref.lrs[m].detach() * g).detach()
    dens = {m: (ref.start[m] - ref.target[m]).pow(2).sum() for m in params}
    for m in params:
        final = ref.start[m] - ref.lrs[m].detach() * grad_sum[m]
        want = 2 * ((final - ref.target[m]) * -grad_sum[m]).sum() / dens[m]
        assert gl[m].item() == pytest.approx(want.item(), rel=1e-9)
        merged_want = want * dens[m] / sum(dens.values())  # what mmdd took before: the merged loss's
        assert gl_a[m].item() == pytest.approx(merged_want.item(), rel=1e-9)


def test_tesla_pass2_redraw_is_the_reference_codes_second_pass():
    """pass2_dropout=redraw (LoRS's/RepBlend's code): pass 2 draws new dropout masks and evaluates each step's gradient
    at the parameters pass 1 reached. Against a plain implementation drawing from the same torch RNG stream."""
    from dataclasses import replace

    from mmdd.models.dual_encoder import DualEncoder
    from mmdd.models.functional import ParamLayout
    from mmdd.models.convnet import ConvNet

    steps = 3

    def dropout_segment():
        seg = segment(steps, 2)
        torch.manual_seed(0)
        bb = ConvNet(image_size=8, width=3, depth=1)
        model = DualEncoder(bb, bb.num_features, text_dim=5, dropout=0.5).double().train()
        for p in model.parameters():
            p.requires_grad_(False)
        return replace(seg, model=model, layout=ParamLayout.from_model(model), pass2_dropout="redraw")

    seg, ref, exact = dropout_segment(), dropout_segment(), replace(dropout_segment(), pass2_dropout="replay")
    torch.manual_seed(123)  # the masks' stream (after building: the models are built with seeds of their own)
    loss, gi, gt, gl = run(tesla, seg)

    mods, lr = list(ref.start), {m: ref.lrs[m].detach() for m in ref.start}

    def grads(params, idx, images, texts, create_graph=False):
        p = {m: params[m].detach().requires_grad_(True) for m in mods}
        logits = functional_logits(ref.model, ref.layout, p, images[idx], texts[idx])
        return dict(zip(mods, torch.autograd.grad(symmetric_infonce(logits), [p[m] for m in mods],
                                                  create_graph=create_graph)))

    torch.manual_seed(123)
    params, reached, batches = {m: ref.start[m].clone() for m in mods}, [], []
    G = {m: torch.zeros_like(ref.start[m]) for m in mods}
    for _ in range(steps):  # pass 1: masks drawn in order, parameters kept
        idx = ref.schedule.next()
        batches.append(idx)
        reached.append(params)
        g = grads(params, idx, ref.images.detach(), ref.texts.detach())
        G = {m: G[m] + g[m] for m in mods}
        params = {m: params[m] - lr[m] * g[m] for m in mods}
    D = {m: (ref.start[m] - ref.target[m]).pow(2).sum() for m in mods}
    gi_ref, gt_ref = torch.zeros_like(ref.images), torch.zeros_like(ref.texts)
    for idx, theta in zip(batches, reached):  # pass 2: the RNG goes on (new masks), at pass 1's parameters
        g = grads(theta, idx, ref.images, ref.texts, create_graph=True)
        s = sum(2 * ((lr[m] * (ref.target[m] - ref.start[m]) + lr[m] ** 2 * G[m]) * g[m]).sum() / D[m] for m in mods)
        a, b = torch.autograd.grad(s, [ref.images, ref.texts])
        gi_ref, gt_ref = gi_ref + a, gt_ref + b
    assert torch.allclose(gi, gi_ref, rtol=1e-10, atol=1e-15)
    assert torch.allclose(gt, gt_ref, rtol=1e-10, atol=1e-15)
    # The exact TESLA (replay) differs here: its pass 2 reuses pass 1's masks.
    torch.manual_seed(123)
    _, gi_replay, _, gl_replay = run(tesla, exact)
    assert not torch.allclose(gi_replay, gi, rtol=1e-3)
    assert all(torch.equal(gl_replay[m], gl[m]) for m in mods)  # the step sizes' gradient is pass 1's alone


def test_contraction_is_the_sum_of_dots_and_hands_each_tensor_its_direction():
    """contract(d, g) = sum_p <d_p, g_p>; a backward from it gives each g_p exactly d_p (the very tensor on the CPU:
    no parameter-sized product is written), a backward with another incoming gradient w * d_p, as a dot's does."""
    from mmdd.methods.trajectory.meta_gradient import contract

    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    directions = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    x = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = [torch.randn(*s, 7, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [wi @ x for wi in w]  # g_p depends on x: the gradient reaches x through d_p
    product = contract(directions, grads)
    assert float(product) == pytest.approx(sum(float((d * g).sum()) for d, g in zip(directions, grads)), rel=1e-14)
    got = torch.autograd.grad(product, grads, retain_graph=True)
    assert all(g is d for g, d in zip(got, directions))
    (x_grad,) = torch.autograd.grad(product, x, retain_graph=True)
    want = sum(torch.einsum("...,...k->k", d, wi) for d, wi in zip(directions, w))
    assert torch.allclose(x_grad, want, rtol=1e-13, atol=0)
    scaled = torch.autograd.grad(product * 2.5, grads)
    assert all(torch.equal(g, 2.5 * d) for g, d in zip(scaled, directions))


def test_tesla_leaves_the_start_and_the_segment_untouched():
    """The student's parameters are views of the start's memory, updated out of place: after an iteration the start
    and target vectors are as they were (the store's snapshots can be read-only memory maps)."""
    seg = segment(3, 2)
    before = {k: v.clone() for k, v in seg.start.items()}
    for v in seg.start.values():
        v.requires_grad_(False)
    run(tesla, seg)
    assert all(torch.equal(seg.start[k], before[k]) for k in before)
