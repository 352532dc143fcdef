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


def _inner_grads(seg: Segment, params: dict[str, list[torch.Tensor]], idx: torch.Tensor, mix, create_graph: bool,
                 detach_data: bool = False):
    """The inner loss's gradient at per-parameter leaves (`params`: each modality's tensors in the layout's order), as
    per-parameter tensors by modality: no flat vector is assembled. `detach_data`: no graph to the images and texts
    (TESLA's pass 1)."""
    images, texts = (seg.images.detach(), seg.texts.detach()) if detach_data else (seg.images, seg.texts)
    logits = functional_logits(seg.model, seg.layout, params, images[idx], texts[idx], mix, seg.from_features)
    leaves = [p for m in params for p in params[m]]
    return by_modality(params, torch.autograd.grad(seg.inner_loss(logits, idx), leaves, create_graph=create_graph))


def by_modality(like: dict[str, list], tensors) -> dict[str, list[torch.Tensor]]:
    """A flat sequence of per-parameter tensors grouped as `like` (modality -> list in the layout's order)."""
    out, i = {}, 0
    for m, group in like.items():
        out[m] = list(tensors[i : i + len(group)])
        i += len(group)
    return out


def leaves_of(params: dict[str, list[torch.Tensor]], requires_grad: bool = True) -> dict[str, list[torch.Tensor]]:
    """Fresh autograd leaves sharing the parameters' memory (no copy)."""
    return {m: [p.detach().requires_grad_(requires_grad) for p in group] for m, group in params.items()}


def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor], step: torch.Tensor) -> list[torch.Tensor]:
    """theta + step * g per parameter tensor, out of place (one fused addcmul each; earlier parameters stay intact for
    those who keep them, e.g. pass 2's redraw); `step` (-lr) stays a tensor: no host sync."""
    return torch._foreach_addcmul([p.detach() for p in params], [g.detach() for g in grads], [step] * len(params))


class Contraction(torch.autograd.Function):
    """sum_p <d_p, g_p> for constant directions d_p. Its backward hands each g_p its direction itself when the incoming
    gradient is exactly 1 (a backward started from this scalar on the CPU, as TESLA's pass 2 does), instead of writing
    the product 1 * d_p, a parameter-sized tensor per inner step (the papers' heads: 17.7M floats), as a dot's
    backward does; elsewhere it multiplies. The same values either way."""

    @staticmethod
    def forward(ctx, count: int, *tensors):
        directions, grads = tensors[:count], tensors[count:]
        ctx.count = count
        ctx.save_for_backward(*directions)
        return torch.stack([torch.dot(d.reshape(-1), g.reshape(-1)) for d, g in zip(directions, grads)]).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        directions = ctx.saved_tensors
        # .item() is free on the CPU; on a GPU the multiply is cheap and a host sync is not.
        if grad_out.device.type == "cpu" and grad_out.item() == 1.0:
            grads = directions
        else:
            grads = tuple(grad_out * d for d in directions)
        return (None, *(None for _ in directions), *grads)


def contract(directions: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """sum_p <directions[p], grads[p]>, differentiable through `grads` only (see Contraction)."""
    return Contraction.apply(len(directions), *directions, *grads)


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
    parameters pass 1 reached, which it keeps (syn_steps parameter vectors); its g_i is then not the step taken.

    The student's parameters are handled per parameter tensor, as views of the flat vectors (ParamLayout.views):
    gradients are taken with respect to them and each update is a fused addcmul per tensor, so no step concatenates
    a gradient into a flat vector or copies the start; only the gradients' sum G is a flat vector (its views are
    accumulated in place), for the step sizes' gradient."""
    mods, layout = list(seg.start), seg.layout
    redraw = seg.pass2_dropout == "redraw"
    reached = []  # redraw: theta_i of pass 1
    # The start's views are never written (updates are out of place): pass 1 and pass 2 both start from them.
    start = {m: layout.views(seg.start[m].detach(), m) for m in mods}
    grad_sum = {m: torch.zeros_like(seg.start[m]) for m in mods}
    grad_sum_views = {m: layout.views(grad_sum[m], m) for m in mods}
    batches = []
    rng = RngReplay(seg.images.device)
    with torch.no_grad():
        lrs = {m: seg.lrs[m].detach() for m in mods}
    step = {m: -lrs[m] for m in mods}
    last = seg.syn_steps - 1

    # Pass 1: the inner loop with detached gradients; keep only their sum and the batches.
    params = start
    for i in range(seg.syn_steps):
        idx = seg.schedule.next()
        mix = seg.blend.draw(len(idx), idx.device) if seg.blend is not None else None
        if redraw:  # pass 2 takes the same batches and blends at these parameters, and draws its own masks
            batches.append((idx, mix, None))
            reached.append(params)
        else:  # pass 2 replays the same batches, blends and dropout masks
            batches.append((idx, mix, rng.get()))
        with torch.enable_grad():
            grads = _inner_grads(seg, leaves_of(params), idx, mix, create_graph=seg.pass1_graph, detach_data=True)
        with torch.no_grad(), scope("flat"):
            for m in mods:
                torch._foreach_add_(grad_sum_views[m], grads[m])
            if i < last:  # the last step's parameters are never used
                params = {m: sgd_step(params[m], grads[m], step[m]) for m in mods}

    with scope("flat"):
        loss, terms, c = tesla_lr_gradient(seg, grad_sum, backward)

    # Pass 2: per step, the direct data gradient of -lr * <c, g_i>, one step deep.
    params = start
    after_pass1 = rng.get()
    with torch.no_grad(), scope("flat"):  # the same for every step
        if seg.pass2 == "forward":
            direction = {m: layout.views(lrs[m] * c[m], m) for m in mods}
        else:  # -lr * c: what a backward of -lr * <c, g_i> hands g_i (step = -lr; one multiply, the same bits)
            direction = {m: layout.views(step[m] * c[m], m) for m in mods}
    for i, (idx, mix, state) in enumerate(batches):
        if redraw:
            params = reached[i]
        else:
            rng.set(state)
        update = not redraw and i < last
        if seg.pass2 == "forward":
            product, grads = directional_step(seg, params, idx, mix, direction, with_grads=update)
            backward(-product, seg.data)
        else:
            grads = _inner_grads(seg, leaves_of(params), idx, mix, create_graph=True)
            with scope("flat"):
                product = contract([d for m in mods for d in direction[m]], [g for m in mods for g in grads[m]])
            backward(product, seg.data)
        if update:
            with torch.no_grad(), scope("flat"):
                params = {m: sgd_step(params[m], grads[m], step[m]) for m in mods}
    if not redraw:  # the generator continues from where pass 1 left it (redraw: after pass 2's draws)
        rng.set(after_pass1)
    return loss.detach(), {m: t.detach() for m, t in terms.items()}


def directional_step(seg: Segment, params: dict[str, torch.Tensor | list[torch.Tensor]], idx, mix,
                     direction: dict[str, torch.Tensor | list[torch.Tensor]], with_grads: bool):
    """TESLA's pass-2 product in forward mode: <direction, g_i> with g_i = dL_i/dtheta at `params`, as the directional
    derivative of the inner loss along `direction` (one jvp: the forward pass carries a tangent), differentiable to
    the data (reverse over forward: exact with mmdd.models.forward_mode's composed norms and softmaxes, wrong with
    some of PyTorch's fused ones); g_i itself is never built with a graph. With `with_grads`, also g_i (detached;
    the next step's parameters), from the same forward pass. `params` and `direction`: per modality, a flat vector or
    the per-parameter tensors in the layout's order. Returns (product, g_i by modality as per-parameter tensors, or
    None)."""
    mods = list(params)
    params, direction = per_parameter(seg.layout, params), per_parameter(seg.layout, direction)
    # ComposedForForwardMode: norms and softmaxes from elementary ops, whose tangents PyTorch differentiates exactly
    with fwAD.dual_level(), ComposedForForwardMode():
        leaf = leaves_of(params, requires_grad=with_grads)
        dual = {m: [fwAD.make_dual(p, t) for p, t in zip(leaf[m], direction[m])] for m in mods}
        logits = functional_logits(seg.model, seg.layout, dual, seg.images[idx], seg.texts[idx], mix, seg.from_features)
        loss, product = fwAD.unpack_dual(seg.inner_loss(logits, idx))
    grads = None
    if with_grads:  # outside the dual level: the backward carries no tangents (no forward mode through it)
        flat_leaves = [p for m in mods for p in leaf[m]]
        grads = by_modality(leaf, torch.autograd.grad(loss, flat_leaves, retain_graph=True))
    return product, grads


def per_parameter(layout: ParamLayout, values: dict[str, torch.Tensor | list[torch.Tensor]]):
    """Each modality's flat vector as its per-parameter views (lists pass through)."""
    return {m: layout.views(v, m) if isinstance(v, torch.Tensor) else v for m, v in values.items()}


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
