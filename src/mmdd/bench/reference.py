"""An independent port of the reference loops' per-iteration work, for `mmdd bench` only.

Written from the public reference code (LoRS `distill_tesla_lors.py`, RepBlend `distill_repblend.py`, MTT-VL
`distill.py`), not from mmdd's strategies: it imports nothing of mmdd's matching, meta-gradient, step-size
gradient or dropout-replay code, so the bench's gradient column checks mmdd against something else. What it
shares with mmdd is the problem itself: the model (its forward, incl. RepBlend's blending), the inner loss
against S, the segment's data and the batch/blend draws (so both paths see the same batches). It spends its
time the way the reference loops do:
- the expert file is read from disk every iteration (`FromDisk` in mmdd.bench.runner) and the student model is
  built anew every iteration (`GradientPath.rebuild`);
- every inner step runs the whole model on the step's pixels, frozen backbone included; TESLA's first pass
  builds a graph (create_graph=True) it never uses, and its second pass runs the model again per step and
  back-propagates to that step's pixels;
- image and text parameter gradients come from two separate autograd calls; step sizes are read with .item();
- TESLA's second pass draws new dropout masks (the reference code does not replay pass 1's: a bug mmdd fixes),
  so the bench compares gradients with the heads' dropout off in both paths.
Never used for distillation; its only job is to be the honest baseline of a measured ratio.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import functional_call


def _named_views(seg, flats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's matched parameters as views of the flat vectors, split as the reference's ReparamModule does
    (`flat_param.split(numels)`, then `view`: one concatenation in the backward, not one full-size zero vector per
    parameter as slicing would make)."""
    named = dict(seg.model.named_parameters())
    out = {}
    for modality, flat in flats.items():
        names = seg.layout.names[modality]
        shapes = [named[n].shape for n in names]
        for name, shape, piece in zip(names, shapes, flat.split([s.numel() for s in shapes])):
            out[name] = piece.view(shape)
    return out


def _logits(seg, flats, idx, mix):
    return functional_call(seg.model, _named_views(seg, flats), (seg.images[idx], seg.texts[idx]), {"mix": mix},
                           strict=False)


def _two_grads(loss, img, txt, create_graph: bool):
    g_img = torch.autograd.grad(loss, img, create_graph=create_graph, retain_graph=True)[0]
    g_txt = torch.autograd.grad(loss, txt, create_graph=create_graph, retain_graph=create_graph)[0]
    return g_img, g_txt


def _draw(seg):
    idx = seg.schedule.next()
    return idx, (seg.blend.draw(len(idx), idx.device) if seg.blend is not None else None)


def reference_full(seg, backward: Callable):
    """MTT-VL's distill.py: the unrolled student, then ||theta - theta*||^2 / ||theta_0 - theta*||^2 per modality."""
    img, txt = (seg.start[m].detach().clone().requires_grad_(True) for m in ("image", "text"))
    start_img, start_txt = img, txt
    for _ in range(seg.syn_steps):
        idx, mix = _draw(seg)
        loss = seg.inner_loss(_logits(seg, {"image": img, "text": txt}, idx, mix), idx)
        g_img, g_txt = _two_grads(loss, img, txt, create_graph=True)
        img = img - seg.lrs["image"] * g_img
        txt = txt - seg.lrs["text"] * g_txt
    d_img = torch.nn.functional.mse_loss(start_img, seg.target["image"], reduction="sum")
    d_txt = torch.nn.functional.mse_loss(start_txt, seg.target["text"], reduction="sum")
    n_img = torch.nn.functional.mse_loss(img, seg.target["image"], reduction="sum")
    n_txt = torch.nn.functional.mse_loss(txt, seg.target["text"], reduction="sum")
    loss = (n_img + n_txt) / (d_img + d_txt) if seg.merged else n_img / d_img + n_txt / d_txt
    backward(loss, [*seg.data, *seg.lrs.values()])
    return loss.detach(), {"image": (n_img / d_img).detach(), "text": (n_txt / d_txt).detach()}


def reference_tesla(seg, backward: Callable):
    """LoRS's distill_tesla_lors.py (RepBlend's loop is the same with blending): pass 1 keeps every step's
    parameters and the summed gradients; the step sizes' gradient comes from each modality's own normalised
    distance; pass 2 back-propagates 2 <lr (theta* - theta_0) + lr^2 G, g_i> / D per step to that step's data."""
    lr_img, lr_txt = seg.lrs["image"].item(), seg.lrs["text"].item()
    start_img, start_txt = seg.start["image"].detach(), seg.start["text"].detach()
    target_img, target_txt = seg.target["image"], seg.target["text"]
    img_params = [start_img.clone().requires_grad_(True)]
    txt_params = [start_txt.clone().requires_grad_(True)]
    sum_img, sum_txt = torch.zeros_like(start_img), torch.zeros_like(start_txt)
    steps = []
    for _ in range(seg.syn_steps):
        idx, mix = _draw(seg)
        steps.append((idx, mix))
        loss = seg.inner_loss(_logits(seg, {"image": img_params[-1], "text": txt_params[-1]}, idx, mix), idx)
        g_img, g_txt = _two_grads(loss, img_params[-1], txt_params[-1], create_graph=True)  # a graph nobody uses
        g_img, g_txt = g_img.detach().clone(), g_txt.detach().clone()
        img_params.append((img_params[-1] - lr_img * g_img).detach().requires_grad_(True))
        txt_params.append((txt_params[-1] - lr_txt * g_txt).detach().requires_grad_(True))
        sum_img += g_img
        sum_txt += g_txt

    d_img = torch.nn.functional.mse_loss(start_img, target_img, reduction="sum")
    d_txt = torch.nn.functional.mse_loss(start_txt, target_txt, reduction="sum")
    single_img, square_img = lr_img * (target_img - start_img), lr_img**2 * sum_img
    single_txt, square_txt = lr_txt * (target_txt - start_txt), lr_txt**2 * sum_txt
    for i, (idx, mix) in enumerate(steps):  # the whole model again, on this step's pixels
        loss_i = seg.inner_loss(_logits(seg, {"image": img_params[i], "text": txt_params[i]}, idx, mix), idx)
        g_img, g_txt = _two_grads(loss_i, img_params[i], txt_params[i], create_graph=True)
        dist_img = (single_img + square_img) @ g_img
        dist_txt = (single_txt + square_txt) @ g_txt
        grand = (dist_img + dist_txt) / (d_img + d_txt) if seg.merged else dist_img / d_img + dist_txt / d_txt
        backward(2 * grand, seg.data)

    # the step sizes: each modality's own ||theta_0 - lr G - theta*||^2 / D, whatever the data loss merges
    img_grand = start_img - seg.lrs["image"] * sum_img - target_img
    txt_grand = start_txt - seg.lrs["text"] * sum_txt - target_txt
    img_grand = img_grand.dot(img_grand) / d_img
    txt_grand = txt_grand.dot(txt_grand) / d_txt
    backward(img_grand + txt_grand, list(seg.lrs.values()))
    return (img_grand + txt_grand).detach(), {"image": img_grand.detach(), "text": txt_grand.detach()}


REFERENCE = {"full": reference_full, "tesla": reference_tesla}
