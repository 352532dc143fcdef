"""Meta-gradient strategies: how the matching loss's gradient reaches the synthetic data.

Both take one trajectory segment and leave the gradients in `.grad` of the synthetic images,
texts and step sizes through `backward(tensor, inputs)` (Lightning's manual_backward, so
precision plugins apply), and return (loss, per-modality terms) detached.

- `full`  (MTT-VL): unroll the student with create_graph and back-propagate through all steps.
          Exact; memory grows linearly with syn_steps.
- `tesla` (TESLA, Cui et al. 2023): constant memory. A first pass takes the inner steps with
          plain (detached) gradients and keeps their sum G. With theta_N = theta_0 - lr*G,
          c = dL/dtheta_N, the data gradient of step i is approximated by the direct term
          d/dX_i [ -lr * <c, g_i(theta_i, X_i)> ], i.e. for the separate loss
          2*<lr*(theta*_target - theta_0) + lr^2*G, g_i> / D, as in the paper; a second pass
          recomputes each g_i with a graph one step deep and back-propagates it at once.
          The lr gradient is that of ||theta_0 - lr*G - theta*||^2 / D with G detached.
          For syn_steps = 1 both strategies give the same gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD

from mmdd.utils.profiling import scope
from mmdd.methods.trajectory.unrolling import Blend, BatchSchedule, matching_loss, unroll_full
from mmdd.models.forward_mode import ComposedForForwardMode
from mmdd.models.functional import ParamLayout, functional_logits

@dataclass
class Segment:
    """Everything one outer iteration matches: expert start/target and the synthetic batch source."""

    model: torch.nn.Module
    layout: ParamLayout
    start: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    lrs: dict[str, torch.Tensor]
    images: torch.Tensor
    texts: torch.Tensor
    schedule: BatchSchedule
    syn_steps: int
    inner_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, batch idx) -> loss
    merged: bool = False
    # TESLA's step-size gradient: of the merged loss too (True), or of the per-modality normalised loss whatever
    # `merged` says (False: what LoRS's and RepBlend's code do; see tesla_lr_gradient)
    lr_merged: bool = False
    # TESLA's pass 2 dropout: replay pass 1's masks (exact) or draw new ones at pass 1's parameters (the reference
    # code; see tesla)
    pass2_dropout: str = "replay"
    # TESLA's pass 1 with create_graph=True, as the reference code: the same gradients in another float32 rounding
    pass1_graph: bool = False
    # TESLA's pass 2 product -lr <c, g_i>: "double_backward" builds g_i with a graph, contracts it with c and
    # differentiates that; "forward" takes it as the inner loss's directional derivative along lr*c (forward mode),
    # never materialising g_i's graph (see directional_step)
    pass2: str = "double_backward"
    extra: tuple[torch.Tensor, ...] = ()  # further learned data the inner loss reads (LoRS's S)
    blend: Blend | None = None  # RepBlend: representation blending per inner step
    from_features: bool = False  # `images` hold cached backbone features (see with_cached_features)

    @property
    def data(self) -> list[torch.Tensor]:
        return [self.images, self.texts, *self.extra]


def full_unroll(seg: Segment, backward: Callable[[torch.Tensor], None]):
    final = unroll_full(
        seg.model, seg.layout, seg.start, seg.lrs, seg.images, seg.texts, seg.schedule, seg.syn_steps, seg.inner_loss,
        seg.blend, seg.from_features,
    )
    loss, terms = matching_loss(final, seg.start, seg.target, merged=seg.merged)
    backward(loss, [*seg.data, *seg.lrs.values()])
    return loss.detach(), {m: t.detach() for m, t in terms.items()}


def _inner_grads(seg: Segment, params: dict[str, torch.Tensor], idx: torch.Tensor, mix, create_graph: bool):
    mods = list(params)
    logits = functional_logits(seg.model, seg.layout, params, seg.images[idx], seg.texts[idx], mix, seg.from_features)
    grads = torch.autograd.grad(seg.inner_loss(logits, idx), [params[m] for m in mods], create_graph=create_graph)
    return dict(zip(mods, grads))


class RngReplay:
    """Saves the RNG state before each step of pass 1 and restores it for that step in pass 2, so
    stochastic layers (the heads' dropout) draw the same masks in the recomputation; afterwards the
    generator continues from where pass 1 left it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def get(self):
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.cuda else None)

    def set(self, state) -> None:
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1], self.device)


def tesla_lr_gradient(seg: Segment, grad_sum: dict[str, torch.Tensor], backward: Callable):
    """TESLA between its passes: the matching loss of theta_0 - lr*G with G detached. Leaves the step sizes'
    gradient in .grad and returns (loss, terms, c = dL/dtheta_N), which weights pass 2's data gradients.

    Under loss_merge=merged the reference code (LoRS distill_tesla_lors.py, RepBlend distill_repblend.py) weights
    the data gradients by the merged loss but takes each step size's gradient from its own modality's term,
    ||theta_0 - lr_m G_m - theta*_m||^2 / D_m: a factor D_m / (D_img + D_txt) apart from the merged loss's. That is
    the default (`seg.lr_merged=False`); `lr_merged=True` takes it from the merged loss (method.tesla_lr_loss=as_loss)."""
    mods = list(seg.start)
    final = {m: seg.start[m] - seg.lrs[m] * grad_sum[m] for m in mods}
    final_leaf = {m: final[m].detach().requires_grad_(True) for m in mods}
    loss, terms = matching_loss(final_leaf, seg.start, seg.target, merged=seg.merged)
    leaves = [final_leaf[m] for m in mods]
    c = dict(zip(mods, torch.autograd.grad(loss, leaves)))
    c_lr = c
    if seg.merged and not seg.lr_merged:
        separate, _ = matching_loss(final_leaf, seg.start, seg.target, merged=False)
        c_lr = dict(zip(mods, torch.autograd.grad(separate, leaves)))
    # d loss / d lr = <c, d final / d lr>; take it through autograd so .grad accumulates as usual.
    backward(sum((final[m] * c_lr[m]).sum() for m in mods), list(seg.lrs.values()))
    return loss, terms, c


def tesla(seg: Segment, backward: Callable[[torch.Tensor], None]):
    """`seg.pass2_dropout`: "replay" (exact TESLA) recomputes each step of pass 2 with the dropout masks pass 1 drew,
    so step i's gradient is the one the student took and the parameters are re-derived step by step (constant memory).
    "redraw" is what LoRS's and RepBlend's code do (distill_tesla_lors.py 402-405): pass 2 draws new masks, at the
    parameters pass 1 reached, which it keeps (syn_steps parameter vectors); its g_i is then not the step taken."""
    mods = list(seg.start)
    redraw = seg.pass2_dropout == "redraw"
    reached = []  # redraw: theta_i of pass 1
    # Pass 1: the inner loop with detached gradients; keep only their sum and the batches.
    params = {m: seg.start[m].detach().clone() for m in mods}
    grad_sum = {m: torch.zeros_like(params[m]) for m in mods}
    batches = []
    rng = RngReplay(seg.images.device)
    with torch.no_grad():
        lrs = {m: seg.lrs[m].detach() for m in mods}
    # Each parameter update is one fused kernel over the parameter vector (addcmul with -lr), not a multiply and a
    # subtract with a temporary (the papers' heads: 17.7M floats per step); -lr stays a tensor (no host sync).
    step = {m: -lrs[m] for m in mods}
    for _ in range(seg.syn_steps):
        idx = seg.schedule.next()
        mix = seg.blend.draw(len(idx), idx.device) if seg.blend is not None else None
        if redraw:  # pass 2 takes the same batches and blends at these parameters, and draws its own masks
            batches.append((idx, mix, None))
            reached.append({m: params[m].detach() for m in mods})
        else:  # pass 2 replays the same batches, blends and dropout masks
            batches.append((idx, mix, rng.get()))
        with torch.enable_grad():
            leaf = {m: params[m].requires_grad_(True) for m in mods}
            images, texts = seg.images.detach(), seg.texts.detach()
            logits = functional_logits(seg.model, seg.layout, leaf, images[idx], texts[idx], mix, seg.from_features)
            grads = torch.autograd.grad(seg.inner_loss(logits, idx), [leaf[m] for m in mods],
                                        create_graph=seg.pass1_graph)
        with torch.no_grad(), scope("flat"):
            for m, g in zip(mods, grads):
                grad_sum[m] += g
                params[m] = torch.addcmul(params[m].detach(), g, step[m])

    with scope("flat"):
        loss, terms, c = tesla_lr_gradient(seg, grad_sum, backward)

    # Pass 2: per step, the direct data gradient of -lr * <c, g_i>, one step deep.
    params = {m: seg.start[m].detach().clone() for m in mods}
    after_pass1 = rng.get()
    direction = {m: lrs[m] * c[m] for m in mods} if seg.pass2 == "forward" else None  # the same for every step
    for i, (idx, mix, state) in enumerate(batches):
        if redraw:
            params = reached[i]
        else:
            rng.set(state)
        if seg.pass2 == "forward":
            product, grads = directional_step(seg, params, idx, mix, direction, with_grads=not redraw)
            backward(-product, seg.data)
        else:
            leaf = {m: params[m].requires_grad_(True) for m in mods}
            grads = _inner_grads(seg, leaf, idx, mix, create_graph=True)
            with scope("flat"):
                product = sum(-(lrs[m] * torch.dot(c[m], grads[m])) for m in mods)  # dot: no temporary
            backward(product, seg.data)
        if not redraw:
            with torch.no_grad(), scope("flat"):
                params = {m: torch.addcmul(params[m].detach(), grads[m].detach(), step[m]) for m in mods}
    if not redraw:  # the generator continues from where pass 1 left it (redraw: after pass 2's draws)
        rng.set(after_pass1)
    return loss.detach(), {m: t.detach() for m, t in terms.items()}


def directional_step(seg: Segment, params: dict[str, torch.Tensor], idx, mix, direction: dict[str, torch.Tensor],
                     with_grads: bool):
    """TESLA's pass-2 product in forward mode: <direction, g_i> with g_i = dL_i/dtheta at `params`, as the directional
    derivative of the inner loss along `direction` (one jvp: the forward pass carries a tangent), differentiable to
    the data (reverse over forward: exact with mmdd.models.forward_mode's composed norms and softmaxes, wrong with
    some of PyTorch's fused ones); g_i itself is never built with a graph. With `with_grads`, also g_i (detached;
    the next step's parameters), from the same forward pass. Returns (product, g_i or None)."""
    mods = list(params)
    # ComposedForForwardMode: norms and softmaxes from elementary ops, whose tangents PyTorch differentiates exactly
    with fwAD.dual_level(), ComposedForForwardMode():
        leaf = {m: params[m].detach().requires_grad_(with_grads) for m in mods}
        dual = {m: fwAD.make_dual(leaf[m], direction[m]) for m in mods}
        logits = functional_logits(seg.model, seg.layout, dual, seg.images[idx], seg.texts[idx], mix, seg.from_features)
        loss, product = fwAD.unpack_dual(seg.inner_loss(logits, idx))
    grads = None
    if with_grads:  # outside the dual level: the backward carries no tangents (no forward mode through it)
        grads = dict(zip(mods, torch.autograd.grad(loss, [leaf[m] for m in mods], retain_graph=True)))
    return product, grads


class PlannedDraws:
    """An iteration's mini-batches and blends drawn up front, in the order the strategies draw them (each step: its
    batch, then its blend), and handed back in that order: the same values as drawing them step by step, known
    before the first step. Stands in for the segment's schedule (`next`) and blend (`draw`)."""

    def __init__(self, schedule: BatchSchedule, blend: Blend | None, steps: int):
        self.steps = []
        for _ in range(steps):
            idx = schedule.next()
            self.steps.append((idx, blend.draw(len(idx), idx.device) if blend is not None else None))
        self._next = self._draw = 0

    def next(self) -> torch.Tensor:
        idx = self.steps[self._next][0]
        self._next += 1
        return idx

    def draw(self, batch_size: int, device=None):
        mix = self.steps[self._draw][1]
        self._draw += 1
        return mix

    def touched(self) -> torch.Tensor:
        """The sorted indices of every pair some step uses."""
        return torch.unique(torch.cat([idx for idx, _ in self.steps]))


def with_cached_features(compute, chunk: int | None = None):
    """Run the meta-gradient `compute` on a frozen backbone's features of the synthetic images, computed once per iteration, and
    only for the images the iteration's mini-batches touch.

    Within an iteration the pixels do not change and the backbone is frozen and batch-independent, so
    every inner step would recompute the same features: compute them once, let the meta-gradient accumulate
    the gradient of all steps on them, and take a single backward pass through the backbone to the pixels.
    The gradient is the same (sum over steps of J^T g_i = J^T sum g_i). The batches and blends are drawn up front
    (`PlannedDraws`: the same draws), so images no step uses are neither encoded nor back-propagated (their
    gradient is zero either way): at budget 499 with 8 steps of 20, 160 images instead of 499. `chunk`: None keeps
    the backbone's graph for the touched images (one forward); an int computes features without a graph and
    recomputes them in chunks of that many images for the backward, so activation memory stays bounded (two
    forwards).
    """

    def run(seg: Segment, backward: Callable[[torch.Tensor], None]):
        backbone, images = seg.model.features, seg.images
        plan = PlannedDraws(seg.schedule, seg.blend, seg.syn_steps)
        touched = plan.touched().to(images.device)
        if chunk:
            with torch.no_grad():
                feats = torch.cat([backbone(images[touched[i : i + chunk]]) for i in range(0, len(touched), chunk)])
        else:
            feats = backbone(images[touched])
        # Untouched rows stay zero: no step reads them, so they get no gradient. In float32 at least: under bf16
        # autocast the features come in bf16, and their gradient sums every inner step's (8 bits would lose them).
        leaf = feats.new_zeros((len(images), *feats.shape[1:]), dtype=torch.promote_types(feats.dtype, torch.float32))
        leaf[touched] = feats.detach().to(leaf.dtype)
        leaf.requires_grad_(True)
        blend = plan if seg.blend is not None else None
        loss, terms = compute(replace(seg, images=leaf, from_features=True, schedule=plan, blend=blend), backward)
        if leaf.grad is not None and images.requires_grad:
            grad = leaf.grad[touched]
            # Plain autograd, not `backward`: leaf.grad already carries any loss scaling of the precision plugin.
            if chunk:
                for i in range(0, len(touched), chunk):
                    rows = touched[i : i + chunk]
                    out = backbone(images[rows])
                    torch.autograd.backward(out, grad_tensors=grad[i : i + chunk].to(out.dtype))
            else:
                torch.autograd.backward(feats, grad_tensors=grad.to(feats.dtype))
        return loss, terms

    return run


# method.meta_gradient -> how a segment's gradient is computed (each takes (segment, backward)).
META_GRADIENTS = {"full": full_unroll, "tesla": tesla}
META_GRADIENT_NAMES = tuple(META_GRADIENTS)


def meta_gradient(name: str):
    if name not in META_GRADIENTS:
        raise ValueError(f"method.meta_gradient must be one of {META_GRADIENT_NAMES}, got {name!r}")
    return META_GRADIENTS[name]
