"""A plain re-implementation of the reference code's per-iteration structure, for `mmdd bench` only.

It computes the same gradients as mmdd's strategies (checked by the benchmark), but the way the public
reference loops (MTT-VL, LoRS/TESLA, RepBlend) spend their time:
- the expert trajectory is read from disk every iteration (`load_expert`), not kept in memory;
- every inner step runs the whole model on the step's pixels, frozen backbone included, and the
  TESLA second pass runs it again and back-propagates to the pixels once per step;
- the inner pass of TESLA builds a graph (create_graph=True) although only detached gradients are used;
- image and text parameter gradients come from two separate autograd calls.
Never used for distillation; its only job is to be the honest baseline of a measured ratio.
"""

from __future__ import annotations

from typing import Callable

import torch

from mmdd.methods.matching import functional_logits, matching_loss
from mmdd.methods.meta_gradient import RngReplay, Segment, tesla_lr_gradient


def _grads_two_calls(seg: Segment, params: dict[str, torch.Tensor], idx, mix, create_graph: bool):
    """Image and text gradients of the inner loss in two autograd calls (the reference code's habit)."""
    logits = functional_logits(seg.model, seg.layout, params, seg.images[idx], seg.texts[idx], mix)
    loss = seg.inner_loss(logits, idx)
    g_img = torch.autograd.grad(loss, params["image"], create_graph=create_graph, retain_graph=True)[0]
    g_txt = torch.autograd.grad(loss, params["text"], create_graph=create_graph)[0]
    return {"image": g_img, "text": g_txt}


def reference_full(seg: Segment, backward: Callable):
    params = {m: seg.start[m].detach().clone().requires_grad_(True) for m in seg.start}
    for _ in range(seg.syn_steps):
        idx = seg.schedule.next()
        mix = seg.blend.draw(len(idx), idx.device) if seg.blend is not None else None
        grads = _grads_two_calls(seg, params, idx, mix, create_graph=True)
        params = {m: params[m] - seg.lrs[m] * grads[m] for m in params}
    loss, terms = matching_loss(params, seg.start, seg.target, merged=seg.merged)
    backward(loss, [*seg.data, *seg.lrs.values()])
    return loss.detach(), {m: t.detach() for m, t in terms.items()}


def reference_tesla(seg: Segment, backward: Callable):
    mods = list(seg.start)
    lrs = {m: seg.lrs[m].detach() for m in mods}
    params = {m: seg.start[m].detach().clone().requires_grad_(True) for m in mods}
    grad_sum = {m: torch.zeros_like(params[m]) for m in mods}
    batches = []
    rng = RngReplay(seg.images.device)  # replayed dropout masks (the reference code draws new ones: a bug)
    for _ in range(seg.syn_steps):
        idx = seg.schedule.next()
        mix = seg.blend.draw(len(idx), idx.device) if seg.blend is not None else None
        batches.append((idx, mix, rng.get()))
        grads = _grads_two_calls(seg, params, idx, mix, create_graph=True)  # a graph nobody uses
        grads = {m: g.detach() for m, g in grads.items()}
        for m in mods:
            grad_sum[m] += grads[m]
        params = {m: (params[m] - lrs[m] * grads[m]).detach().requires_grad_(True) for m in mods}

    # mmdd's own step between the passes (the step-size gradient, per modality as the reference code takes it)
    loss, terms, c = tesla_lr_gradient(seg, grad_sum, backward)

    params = {m: seg.start[m].detach().clone().requires_grad_(True) for m in mods}
    after_pass1 = rng.get()
    for idx, mix, state in batches:  # the whole model again on the pixels, and a backward to them, per step
        rng.set(state)
        grads = _grads_two_calls(seg, params, idx, mix, create_graph=True)
        backward(sum(-(lrs[m] * (c[m] * grads[m]).sum()) for m in mods), seg.data)
        params = {m: (params[m] - lrs[m] * grads[m].detach()).detach().requires_grad_(True) for m in mods}
    rng.set(after_pass1)
    return loss.detach(), {m: t.detach() for m, t in terms.items()}


REFERENCE = {"full": reference_full, "tesla": reference_tesla}
