"""`mmdd plan <stage> [overrides]`: what a stage will hold, before it runs.

For the composed config: parameter counts, the trajectory store's size on disk, and an estimate of peak device
memory per stage (teachers, distillation with the full unroll or TESLA, students). Nothing is computed for real:
the model, the synthetic set and the expert snapshots are built on PyTorch's `meta` device (shapes only, no
weights, no network) and one step of the stage's own code runs there (a teacher's training step; one outer
iteration of the configured meta-gradient, mmdd.methods.trajectory.meta_gradient, with its outer SGD step) under PyTorch's
dispatch-mode tracker (`LiveBytes`) that follows every tensor storage from the op that made it until its last
reference dies, and keeps the peak. Left out: the allocator's slack and fragmentation, CUDA's context and
cuDNN/cuBLAS workspaces (a few hundred MB on a GPU). experiments/bench.md compares the estimate with the resident
set measured on CPU.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mmdd.errors import MmddError
from mmdd.teachers.store_size import store_bytes
from mmdd.utils.io import human_bytes

FLOAT_BYTES = 4  # snapshots, sets and weights are float32 (bf16 autocast changes activations, not these)


@dataclass
class Estimate:
    """Peak device memory of one stage, by part (bytes)."""

    stage: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def text_dim(cfg) -> int:
    """The text encoder's width from its config file alone (no weights, no network)."""
    from transformers import AutoConfig

    from mmdd.models.text_encoder import resolve_model_path

    name = str(cfg.model.text.name_or_path)
    try:
        return int(AutoConfig.from_pretrained(resolve_model_path(name), local_files_only=True).hidden_size)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/... for a missing model
        raise MmddError(f"mmdd plan needs the text encoder's config to know its width: model.text.name_or_path={name!r} "
                        f"is not a local model folder here ({type(exc).__name__}); point it at a folder with a "
                        "config.json (e.g. a downloaded bert-base-uncased)") from exc


def meta_model(cfg, dim: int, device="meta"):
    """The stage's dual encoder with shapes only (on `meta`): no weights are loaded (pretrained/checkpoint do not
    change the shapes)."""
    from mmdd.models.dual_encoder import build_dual_encoder

    model_cfg = copy.deepcopy(cfg.model)
    OmegaConf.set_struct(model_cfg, False)
    model_cfg.image.pretrained = False
    model_cfg.image.checkpoint = None
    with torch.device(device):
        model = build_dual_encoder(model_cfg, dim, cfg.data.image_size)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _bytes(n: int) -> int:
    return int(n) * FLOAT_BYTES


def counts(model) -> dict[str, int]:
    names = model.modality_parameter_names()
    named = dict(model.named_parameters())
    return {
        "image backbone": sum(p.numel() for n, p in named.items() if n.startswith("backbone.")),
        "image head": sum(p.numel() for n, p in named.items() if n.startswith("image_head.")),
        "text head": sum(p.numel() for n, p in named.items() if n.startswith("text_head.")),
        "matched image": sum(named[n].numel() for n in names["image"]),
        "matched text": sum(named[n].numel() for n in names["text"]),
    }


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages made inside the block and still alive (`with LiveBytes() as m: ...`, then
    `m.peak`). Every op's outputs are followed; a storage counts until its last reference dies (PyTorch keeps one
    Python object per storage, so a weak reference to it says when). Works on the meta device: shapes only."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, weakref.ref]] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        nbytes, _ = self.live.pop(key, (0, None))
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live:
                    self.live[key] = (st.nbytes(), weakref.ref(st, lambda _, k=key: self._free(k)))
                    self.current += st.nbytes()
                    self.peak = max(self.peak, self.current)
        return out


def tracked_peak(step) -> int:
    """Peak bytes of the tensors `step()` makes (it allocates on the meta device)."""
    with LiveBytes() as tracker:
        step()
    return tracker.peak


def training_step(cfg, model, dim: int, batch: int, momentum: float, weight_decay: float, device="meta"):
    """One SGD step of a teacher or student (InfoNCE on `batch` pairs), as ExpertModule/StudentModule take it."""
    from mmdd.models.losses import pair_loss

    size = cfg.data.image_size
    matched = set(sum(model.modality_parameter_names().values(), []))
    params = [p for n, p in model.named_parameters() if n in matched]

    def step():
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=0.1, momentum=momentum, weight_decay=weight_decay)
        model.train()
        with torch.device(device):
            images, texts = torch.zeros(batch, 3, size, size), torch.zeros(batch, dim)
        pair_loss("infonce", model(images, texts), None, 0.1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)

    return step


def training_estimate(cfg, model, dim: int, stage: str, batch: int, momentum: float, weight_decay: float) -> Estimate:
    parts = {"weights": _bytes(sum(p.numel() for p in model.parameters())),
             "one training step (activations, gradients, optimizer state)":
                 tracked_peak(training_step(cfg, model, dim, batch, momentum, weight_decay))}
    return Estimate(f"{stage} (batch {batch})", parts)


def distill_step(cfg, model, dim: int, method, device="meta"):
    """One outer iteration of trajectory matching as the outer loop takes it: the configured meta-gradient (on cached
    frozen-backbone features where the run would cache them) and the outer SGD step over the set, with the two
    expert snapshots on the device."""
    from mmdd.methods.engine.outer_loop import outer_optimizer
    from mmdd.methods.trajectory.objective import build_segment, meta_gradient_for
    from mmdd.models.functional import ParamLayout
    from mmdd.synthetic.similarity import build_similarity
    from mmdd.synthetic.synthetic_set import SyntheticSet

    mc = method.settings
    budget = cfg.budget - (1 if mc.similarity else 0)
    size = cfg.data.image_size
    layout = ParamLayout.from_model(model)
    model.train()

    def step():
        with torch.device(device):
            start = {m: torch.zeros(layout.numel(m)) for m in ("image", "text")}
            target = {m: torch.full((layout.numel(m),), 0.01) for m in ("image", "text")}
            sim = build_similarity(dict(mc.similarity), budget, torch.Generator()) if mc.similarity else None
            syn = SyntheticSet(torch.zeros(budget, 3, size, size), torch.zeros(budget, dim),
                               {"image": mc.lr_init, "text": mc.lr_init}, sim)
        syn.to(device)
        opt = outer_optimizer(syn, mc)
        # indices stay on the CPU (meta tensors have no values to draw from; unique() has no meta kernel)
        index_device = None if device == "meta" else torch.device(device)
        seg = build_segment(model, layout, syn, mc, start, target, torch.Generator(), index_device)
        meta_gradient_for(mc, model)(seg, lambda t, inputs: t.backward(inputs=inputs))
        opt.step()

    return step


def distill_estimate(cfg, model, dim: int, method) -> Estimate:
    mc = method.settings
    parts = {"weights": _bytes(sum(p.numel() for p in model.parameters())),
             "one outer iteration (set, snapshots, meta-gradient, outer step)":
                 tracked_peak(distill_step(cfg, model, dim, method))}
    budget = cfg.budget - (1 if mc.similarity else 0)
    name = "full unroll" if mc.meta_gradient == "full" else "TESLA"
    return Estimate(f"distill, {name} ({mc.syn_steps} steps of batch {min(mc.batch_syn or budget, budget)})", parts)


def distribution_estimate(cfg, model, dim: int, method) -> Estimate:
    mc = method.settings
    parts = {"weights": _bytes(sum(p.numel() for p in model.parameters())),
             "one outer iteration (set, real and synthetic batches, loss, outer step)":
                 tracked_peak(distribution_step(cfg, model, dim, method))}
    return Estimate(f"distill, {cfg.method.name} (synthetic batch {mc.syn_batch_size(cfg.budget)}, real batch "
                    f"{mc.real_batch})", parts)


def distribution_step(cfg, model, dim: int, method, device="meta"):
    """One outer iteration of a distribution-matching method (mmdd.methods.distribution.objective): the set, a real
    batch embedded without grad, a synthetic batch embedded with it, the loss, its backward to the set, the step."""
    from mmdd.methods.engine.outer_loop import outer_optimizer
    from mmdd.synthetic.synthetic_set import SyntheticSet

    mc = method.settings
    size, budget = cfg.data.image_size, cfg.budget
    n = mc.syn_batch_size(budget)

    def step():
        with torch.device(device):
            syn = SyntheticSet(torch.zeros(budget, 3, size, size), torch.zeros(budget, dim),
                               {"image": mc.lr_init, "text": mc.lr_init})
            real_images, real_texts = torch.zeros(mc.real_batch, 3, size, size), torch.zeros(mc.real_batch, dim)
        syn.to(device)
        opt = outer_optimizer(syn, mc)
        with torch.no_grad():
            real = model.encode_image(real_images), model.encode_text(real_texts)
        loss, _ = method.loss_cls(mc)(model.encode_image(syn.images[:n]), model.encode_text(syn.texts[:n]), *real)
        loss.backward(inputs=[syn.images, syn.texts])
        opt.step()

    return step


def student_estimate(cfg, model, dim: int) -> Estimate:
    p = cfg.protocol
    return training_estimate(cfg, model, dim, "evaluate, one student", p.batch_size, p.momentum,
                             p.weight_decay)


def make_plan(cfg) -> dict:
    """Everything `mmdd plan` prints, as data."""
    from hydra.utils import instantiate

    dim = text_dim(cfg)
    model = meta_model(cfg, dim)
    plan = {"counts": counts(model), "store_bytes": store_bytes(cfg, model), "buffer_dir": str(cfg.buffer_dir),
            "estimates": [training_estimate(cfg, model, dim, "buffer, one teacher", cfg.teacher.batch_size,
                                            cfg.teacher.momentum, cfg.teacher.weight_decay)]}
    method = instantiate(cfg.method) if "method" in cfg else None
    kind = getattr(method, "distillation_kind", None)
    if kind == "trajectory":
        for strategy in ("full", "tesla"):
            variant = copy.deepcopy(method)
            variant.settings.meta_gradient = strategy
            plan["estimates"].append(distill_estimate(cfg, model, dim, variant))
        plan["method_meta_gradient"] = method.settings.meta_gradient
        mc = method.settings
        experts = min(cfg.teacher.num_experts, mc.max_experts or cfg.teacher.num_experts)
        each = store_bytes(cfg, model) // max(cfg.teacher.num_experts * (cfg.teacher.epochs + 1), 1)
        drawn = experts * (mc.max_start_epoch - mc.min_start_epoch + mc.expert_epochs)
        plan["snapshot_cache"] = {"snapshots": drawn, "bytes_each": each, "setting": str(cfg.hardware.get(
            "snapshot_cache_mb", "auto"))}
    elif kind == "distribution":
        plan["estimates"].append(distribution_estimate(cfg, model, dim, method))
    elif method is not None and method.learned:
        plan["unestimated"] = (f"distill: no estimate for method={cfg.method.name} ({type(method).__name__} sets no "
                               "distillation_kind that mmdd.plan models); its peak is not among the figures below")
    plan["estimates"].append(student_estimate(cfg, model, dim))
    return plan


def format_plan(cfg, plan: dict) -> str:
    c = plan["counts"]
    lines = [f"model {cfg.model.name} at {cfg.data.image_size} px, text {cfg.model.text.name_or_path}; "
             f"method {cfg.method.name}, budget {cfg.budget}",
             "parameters: " + ", ".join(f"{k} {v:,}" for k, v in c.items()),
             f"trajectory store: {cfg.teacher.num_experts} experts x {cfg.teacher.epochs + 1} snapshots = "
             f"{human_bytes(plan['store_bytes'])} on disk ({plan['buffer_dir']})",
             "peak device memory, estimated (live tensors; allocator slack and CUDA context come on top: see mmdd.plan):"]
    cache = plan.get("snapshot_cache")
    if cache:
        lines.insert(-1, f"expert snapshots the draws can ask for: {cache['snapshots']} x {human_bytes(cache['bytes_each'])} = "
                         f"{human_bytes(cache['snapshots'] * cache['bytes_each'])}; hardware.snapshot_cache_mb={cache['setting']} "
                         "keeps them on the GPU between draws (auto: all of them, up to a tenth of its memory), on top "
                         "of the distillation's peak below")
    if plan.get("unestimated"):
        lines.append(f"  {plan['unestimated']}")
    for est in plan["estimates"]:
        mark = " <- this run" if plan.get("method_meta_gradient") and est.stage.startswith("distill") and (
            ("TESLA" in est.stage) == (plan["method_meta_gradient"] == "tesla")) else ""
        lines.append(f"  {est.stage}: {human_bytes(est.total)}{mark}")
        lines += [f"      {k}: {human_bytes(v)}" for k, v in est.parts.items() if v]
    return "\n".join(lines)


# The share of a GPU's memory a run's live tensors may take: the CUDA context, cuDNN workspaces and the caching
# allocator's slack take the rest (peak reserved runs 10-25 % above peak allocated).
USABLE_SHARE = 0.85


def check_distill_fits(cfg, method=None, dim: int | None = None, available: int | None = None) -> None:
    """Before a trajectory-matching distillation trains anything: refuse it when its estimated peak (`mmdd plan`'s,
    live fp32 tensors) exceeds USABLE_SHARE of the GPU's memory (`available` bytes; default: this process's GPU, and
    nothing is checked on the CPU), naming the departures that fit with their estimates. hardware.memory_check=false
    skips the check (e.g. to try a cell the estimate is wrong about); under bf16 the fp32 estimate is an upper bound,
    so it is not checked."""

    if not bool(cfg.hardware.get("memory_check", True)) or str(cfg.hardware.precision) != "32-true":
        return
    if available is None:
        from mmdd.utils.trainer import process_device

        device = process_device(cfg.hardware)
        if device.type != "cuda":
            return
        available = torch.cuda.get_device_properties(device).total_memory
    if method is None:
        from hydra.utils import instantiate

        method = instantiate(cfg.method)
    if getattr(method, "distillation_kind", None) != "trajectory":
        return
    dim = dim or text_dim(cfg)
    model = meta_model(cfg, dim)
    need = distill_estimate(cfg, model, dim, method).total
    usable = USABLE_SHARE * available
    if need <= usable:
        return
    mc = method.settings
    budget = cfg.budget - (1 if mc.similarity else 0)
    batch = min(mc.batch_syn or budget, budget)
    options = []
    if mc.meta_gradient == "full":
        options.append(("method.meta_gradient=tesla (TESLA's pass: one inner step's activations at a time; its "
                        "gradient is an approximation of the full unroll's)", {"meta_gradient": "tesla"}))
    options += [(f"method.batch_syn={b} (inner mini-batches of {b} instead of {batch})", {"batch_syn": b})
                for b in (50, 20) if b < batch]
    fitting = []
    for text, change in options:
        variant = copy.deepcopy(method)
        for key, value in change.items():
            setattr(variant.settings, key, value)
        total = distill_estimate(cfg, model, dim, variant).total
        if total <= usable:
            fitting.append(f"{text}: about {human_bytes(total)}")
    choices = "; ".join(fitting) if fitting else "none of meta_gradient=tesla or smaller batch_syn fits alone"
    raise MmddError(f"{cfg.method.name} at budget {cfg.budget}, {cfg.data.image_size} px ({mc.meta_gradient} "
                    f"meta-gradient, {mc.syn_steps} inner steps of batch {batch}) needs about {human_bytes(need)} of GPU "
                    f"memory by mmdd plan's estimate, and {USABLE_SHARE:.0%} of this GPU's {human_bytes(available)} is "
                    f"{human_bytes(usable)}. Choose a departure (the set's manifest records it): {choices}; or "
                    "hardware=gpu_bf16 (bf16 autocast: roughly half the activations, not estimated here); or "
                    "hardware.memory_check=false to try anyway")

