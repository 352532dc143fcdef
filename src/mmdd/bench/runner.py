"""`mmdd bench`: seconds per distillation iteration and peak memory, mmdd's path against the reference loop.

Both paths start from the same synthetic set and draw the same expert, start epoch, mini-batches and
blends (one generator seed), take the same outer SGD step, and differ only in how the iteration's
gradients are computed: mmdd's strategy (two snapshots read memory-mapped per iteration, one fused autograd call, a frozen
backbone's features once per iteration) or `mmdd.bench.reference` (the reference code's structure).
The gradients of the first iteration are compared (max relative difference per tensor).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from mmdd.bench.breakdown import breakdown_cells, time_breakdown
from mmdd.bench.flops import iteration_costs, matmul_peak, memory_bandwidth
from mmdd.bench.memory import PeakMemory
from mmdd.bench.reference import REFERENCE
from mmdd.data.splits import load_data
from mmdd.errors import MmddError
from mmdd.methods.context import MethodContext
from mmdd.methods.engine.outer_loop import outer_optimizer
from mmdd.models.functional import ParamLayout
from mmdd.methods.trajectory.draws import draw_segment_start
from mmdd.methods.trajectory.objective import build_segment, caches_features, meta_gradient_for
from mmdd.teachers.trajectory_store import TrajectoryStore, flatten_trajectory
from mmdd.utils.io import atomic_write_json, atomic_write_text
from mmdd.utils.logging import build_loggers, finish_loggers, log_metrics
from mmdd.utils.seed import seed_everything
from mmdd.utils.cpu_heap import configure_cpu_heap
from mmdd.utils.profiling import scope
from mmdd.utils.trainer import accelerate_model, hardware_record

log = logging.getLogger(__name__)
PATHS = ("reference", "ours")


class GradientPath:
    """One way of computing an iteration's gradients: a trajectory source and a meta-gradient strategy.
    The draws and the segment's data are the distillation's own (mmdd.methods.trajectory.objective). `rebuild`: build the
    model anew every iteration (the reference loops construct their student networks per iteration)."""

    def __init__(self, model, layout, config, strategy, source, autocast: torch.dtype | None = None, rebuild=None):
        self.model, self.layout, self.config = model, layout, config
        self.strategy = strategy
        self.source = source  # (expert, start epoch) -> (start params, target params)
        self.autocast = autocast  # hardware.precision bf16-mixed / 16-mixed: what Lightning wraps a step in
        self.rebuild = rebuild

    def gradients(self, syn, gen: torch.Generator, device) -> torch.Tensor:
        cfg = self.config
        expert, start_epoch = draw_segment_start(gen, self.source.n_experts, cfg.max_start_epoch)
        with scope("data"):
            start, target = self.source(expert, start_epoch, cfg.expert_epochs, device)
        if self.rebuild is not None:
            self.model = self.rebuild()
        with scope("data"):
            seg = build_segment(self.model, self.layout, syn, cfg, start, target, gen, device)
        with torch.autocast(device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            loss, _ = self.strategy(seg, lambda t, inputs: t.backward(inputs=inputs))
        return loss


def autocast_dtype(precision: str) -> torch.dtype | None:
    precision = str(precision)
    if precision.startswith("bf16") and precision.endswith("mixed"):
        return torch.bfloat16
    if precision.startswith("16") and precision.endswith("mixed"):
        return torch.float16
    return None


class Snapshots:
    """mmdd's way: the two snapshots of the segment, read memory-mapped (mmdd.teachers.trajectory_store)."""

    def __init__(self, reader):
        self.reader, self.n_experts = reader, reader.n_experts

    def __call__(self, expert, start, span, device):
        return self.reader.segment(expert, start, span, device)


class FromDisk:
    """The reference loops' way: read the expert's file at every iteration."""

    def __init__(self, store: TrajectoryStore, names: dict[str, list[str]], experts: list[int]):
        self.store, self.names, self.experts = store, names, experts
        self.n_experts = len(experts)

    def __call__(self, expert, start, span, device):
        traj = self.store.load_expert(self.experts[expert])
        flat = {m: flatten_trajectory(traj, self.names[m]).to(device) for m in self.names}
        return {m: t[start] for m, t in flat.items()}, {m: t[start + span] for m, t in flat.items()}


class dropout_off:
    """Within the block every Dropout of the given models has p = 0 (restored after)."""

    def __init__(self, *models):
        self.layers = [m for model in models for m in model.modules() if isinstance(m, torch.nn.Dropout)]

    def __enter__(self):
        self.saved = [m.p for m in self.layers]
        for m in self.layers:
            m.p = 0.0

    def __exit__(self, *exc):
        for m, p in zip(self.layers, self.saved):
            m.p = p
        return False


def grads_of(syn) -> dict[str, torch.Tensor]:
    out = {"images": syn.images.grad, "texts": syn.texts.grad, **{f"lr_{m}": p.grad for m, p in syn.lrs.items()}}
    if syn.similarity is not None:
        out.update({f"sim_{n}": p.grad for n, p in syn.similarity.named_parameters()})
    return {k: v.detach().clone() for k, v in out.items() if v is not None}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def gradient_agreement(paths: dict, fresh, seed: int, device, path: str, against: str, models) -> dict[str, float]:
    """The largest relative difference per gradient (images, texts, step sizes, S) of `path`'s first iteration from
    `against`'s: the same draws and global RNG, every Dropout of `models` off."""
    grads = {}
    with dropout_off(*models):
        for name in (path, against):
            syn, _ = fresh()
            torch.manual_seed(seed)
            paths[name].gradients(syn, torch.Generator().manual_seed(seed), device)
            grads[name] = grads_of(syn)
    return {k: relative_difference(grads[path][k], grads[against][k]) for k in grads[against]}


def interleaved_rounds(paths: dict, fresh, seed: int, device, warmup: int, iterations: int, lr_min: float):
    """Time whole iterations (gradients and the outer step) of each path in interleaved rounds, one iteration of
    each per round, so drifts of the machine hit all alike; then one more iteration of each, untimed, under the
    memory probe. Returns per path the timed seconds (after `warmup` rounds), the peak memory in MB, and the peak
    reserved memory (GPU; else None).

    The probe is kept out of the timed iterations: on the CPU it hands the freed heap back to the OS before it
    measures (mmdd.bench.memory), so the iteration it watches page-faults every buffer anew, which is not how a
    distillation runs."""
    state = {}
    for name in paths:
        syn, opt = fresh()
        state[name] = (syn, opt, torch.Generator().manual_seed(seed))

    def iteration(name):
        syn, opt, gen = state[name]
        opt.zero_grad()
        paths[name].gradients(syn, gen, device)
        opt.step()
        syn.clamp_lrs_(lr_min)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    timings = {n: [] for n in paths}
    for i in range(warmup + iterations):
        for name in paths:
            t0 = time.perf_counter()
            iteration(name)
            if i >= warmup:
                timings[name].append(time.perf_counter() - t0)
    memory, reserved = {}, {}
    for name in paths:
        with PeakMemory(device) as pm:
            iteration(name)
        memory[name], reserved[name] = pm.peak_mb, pm.reserved_mb
    return timings, memory, reserved


class MatchingSetup:
    """What a timed comparison of trajectory-matching iterations starts from: the method, its context, the model
    (frozen, prepared by the method), its layout, the store's trajectories and the initial set on `device`."""

    def __init__(self, cfg, train, device, out_dir):
        configure_cpu_heap(cfg.hardware.cpu_heap)  # as a distillation's trainer does
        self.method = instantiate(cfg.method)
        if self.method.distillation_kind != "trajectory":
            raise MmddError(f"mmdd bench times trajectory matching; method={cfg.method.name} is not a matching method")
        self.context = MethodContext.of(cfg, train, out_dir)
        self.device = device
        self.model = self.build_model()
        self.layout = ParamLayout.from_model(self.model)
        self.trajectories = self.context.store.open(self.model, self.method.settings.max_experts)
        self.syn0 = self.method.initial_set(self.context, self.method.settings.pairs(self.context.budget)).to(device)

    def build_model(self):
        model = self.context.model.build().to(self.device)
        self.method.prepare_model(model)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def fresh(self):
        """A copy of the initial set and its outer optimizer (each path starts from the same)."""
        syn = copy.deepcopy(self.syn0)
        return syn, outer_optimizer(syn, self.method.settings)


def run_bench(cfg, data=None, out_dir: str | Path | None = None) -> dict:
    seed_everything(cfg.seed)
    b = cfg.bench
    device = torch.device("cuda" if cfg.hardware.accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu")
    data = data or load_data(cfg, splits=("train",))
    setup = MatchingSetup(cfg, data["train"], device, out_dir or cfg.paths.output_dir)
    method, model, layout, trajectories, syn0 = setup.method, setup.model, setup.layout, setup.trajectories, setup.syn0
    mc, budget, fresh = method.settings, cfg.budget, setup.fresh

    cached = caches_features(mc, model)
    fast = accelerate_model(copy.deepcopy(model), cfg.hardware, second_order=True)

    def rebuild():
        fresh_model = setup.build_model()
        for new, old in zip(fresh_model.modules(), model.modules()):  # dropout as the template's (see dropout_off)
            if isinstance(new, torch.nn.Dropout):
                new.p = old.p
        return fresh_model.train(model.training)

    paths = {
        "reference": GradientPath(model, layout, mc, REFERENCE[mc.meta_gradient],
                                  FromDisk(trajectories.store, trajectories.names, trajectories.experts),
                                  rebuild=rebuild if b.rebuild_model else None),
        # mmdd's path also gets the hardware's speed switches (channels-last, compile, autocast; all off on CPU).
        "ours": GradientPath(fast, layout, mc, meta_gradient_for(mc, fast), Snapshots(trajectories),
                             autocast_dtype(cfg.hardware.precision)),
    }

    # Gradient agreement on the first iteration, like with like: the same draws (same generator seed), the same
    # global RNG, and the heads' dropout off (the reference's TESLA draws new masks in its second pass).
    agreement = gradient_agreement(paths, fresh, cfg.seed, device, "ours", "reference", (model, fast))
    timings, memory, reserved = interleaved_rounds(paths, fresh, cfg.seed, device, int(b.warmup), int(b.iterations),
                                                   mc.lr_min)
    for name in PATHS:
        log.info("%s: median %.3f s/iter over %d iterations, peak memory %.0f MB (%s)", name,
                 statistics.median(timings[name]), len(timings[name]), memory[name], PeakMemory(device).kind)

    # The floor: each path's FLOPs and bytes per iteration (one more iteration, counted), the rate its median
    # achieves, the machine's measured matmul peak in the precision the iteration computes in and its copy bandwidth,
    # and the roofline floor they give (mmdd.bench.flops).
    costs = {name: iteration_costs(iteration_of(path, fresh, cfg.seed, device, mc.lr_min))
             for name, path in paths.items()}
    flops = {name: c.flops for name, c in costs.items()}
    peak = matmul_peak(device, dtype=torch.bfloat16 if autocast_dtype(cfg.hardware.precision) else torch.float32)
    bandwidth = memory_bandwidth(device)
    # Where the time goes, by part of the iteration (mmdd.bench.breakdown): one profiled iteration per path, after a
    # first one (the profiler's own warm-up)
    parts = {}
    for name, path in paths.items():
        iteration = iteration_of(path, fresh, cfg.seed, device, mc.lr_min)
        iteration()
        parts[name] = time_breakdown(iteration, device)
    profiles = {}
    if int(b.get("profile", 0)):
        profiles = profile_paths(paths, fresh, int(b.profile), cfg.seed, device, mc.lr_min)

    med = {n: statistics.median(t) for n, t in timings.items()}
    result = {
        "method": str(cfg.method.name), "budget": budget, "pairs": len(syn0), "dataset": str(cfg.data.name),
        "model": str(cfg.model.name), "device": str(device), "meta_gradient": mc.meta_gradient,
        "syn_steps": mc.syn_steps, "batch_syn": mc.batch_syn, "cached_backbone_features": bool(cached),
        "precision": cfg.hardware.precision, "channels_last": fast.channels_last,
        "compiled_backbone": fast.compiled,
        "iterations": int(b.iterations), "warmup": int(b.warmup),
        "sec_per_iter": med, "seconds": timings, "speedup": med["reference"] / med["ours"],
        "peak_mem_mb": memory, "memory_kind": PeakMemory(device).kind, "peak_reserved_mb": reserved,
        "hardware": hardware_record(cfg.hardware),
        "grad_max_rel_diff": max(agreement.values()), "grad_rel_diff": agreement,
        "flops_per_iter": flops, "achieved_flops": {n: flops[n] / med[n] for n in flops}, "matmul_peak_flops": peak,
        "bytes_per_iter": {n: c.bytes for n, c in costs.items()}, "memory_bandwidth": bandwidth,
        "floor_seconds": {n: c.floor(peak, bandwidth) for n, c in costs.items()},
        "time_parts": parts,
    }
    out = Path(out_dir or cfg.paths.output_dir)
    for name, table in profiles.items():
        atomic_write_text(out / f"profile_{name}.txt", table + "\n")
    atomic_write_json(out / "bench.json", result)
    atomic_write_text(out / "bench.md", bench_table([result]) + "\n")
    loggers = build_loggers(cfg, job_type="bench", name=f"bench_{cfg.method.name}_b{budget}")
    try:
        log_metrics(loggers, {"bench/sec_per_iter_ours": med["ours"], "bench/sec_per_iter_reference": med["reference"],
                              "bench/speedup": result["speedup"], "bench/peak_mem_mb_ours": memory["ours"],
                              "bench/peak_mem_mb_reference": memory["reference"],
                              "bench/grad_max_rel_diff": result["grad_max_rel_diff"]})
    finally:
        finish_loggers(loggers)
    return result


def iteration_of(path: GradientPath, fresh, seed: int, device, lr_min):
    """One iteration of `path` (its gradients and the outer step) on a fresh set, as a function to call."""
    syn, opt = fresh()
    gen = torch.Generator().manual_seed(seed)

    def iteration():
        opt.zero_grad()
        path.gradients(syn, gen, device)
        opt.step()
        syn.clamp_lrs_(lr_min)

    return iteration


def profile_paths(paths: dict, fresh, iterations: int, seed: int, device, lr_min) -> dict[str, str]:
    """torch.profiler over `iterations` iterations of each path (after the timed ones): the top operators by self
    time, as a table per path."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for name, path in paths.items():
        syn, opt = fresh()
        gen = torch.Generator().manual_seed(seed)
        with profile(activities=activities) as prof:
            for _ in range(iterations):
                opt.zero_grad()
                path.gradients(syn, gen, device)
                opt.step()
                syn.clamp_lrs_(lr_min)
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=15)
    return tables


def bench_table(results: list[dict]) -> str:
    """One row per result; GFLOP per iteration, the rate achieved (GFLOP/s) and its share of the measured matmul
    peak, per path, where the result has them (results before 2026-12-07 do not), and the bytes moved and the
    roofline floor (mmdd.bench.flops; results after issue 28's third session); under the table, where each path's
    time goes (results from 2026-12-07 on)."""
    head = ["method", "budget", "device", "precision", "s/iter reference", "s/iter mmdd", "speedup", "peak MB reference",
            "peak MB mmdd", "max rel. grad diff", "GFLOP/iter reference / mmdd", "GFLOP/s reference / mmdd (of peak)",
            "GB moved/iter reference / mmdd", "floor s/iter reference / mmdd (roofline)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([
            r["method"], str(r["budget"]), r["device"], r.get("precision", "32-true"),
            f"{r['sec_per_iter']['reference']:.3f}",
            f"{r['sec_per_iter']['ours']:.3f}", f"{r['speedup']:.2f}×", f"{r['peak_mem_mb']['reference']:.0f}",
            f"{r['peak_mem_mb']['ours']:.0f}", f"{r['grad_max_rel_diff']:.1e}", *flop_cells(r)]) + " |")
    parts = [r for r in results if r.get("time_parts")]
    if parts:
        lines += ["", "Where the time goes (one profiled iteration per path; shares applied to the median s/iter):"]
        for r in parts:
            for name, label in (("ours", "mmdd"), ("reference", "reference")):
                lines.append(f"- {r['method']} {r['budget']}, {label}: "
                             f"{breakdown_cells(r['time_parts'][name], r['sec_per_iter'][name])}")
    return "\n".join(lines)


def flop_cells(r: dict) -> list[str]:
    if "flops_per_iter" not in r:
        return ["", "", "", ""]
    f, a, peak = r["flops_per_iter"], r["achieved_flops"], r["matmul_peak_flops"]
    cells = [f"{f['reference'] / 1e9:.1f} / {f['ours'] / 1e9:.1f}",
             f"{a['reference'] / 1e9:.1f} / {a['ours'] / 1e9:.1f} ({a['reference'] / peak:.0%} / {a['ours'] / peak:.0%}"
             f" of {peak / 1e9:.0f})"]
    if "floor_seconds" not in r:
        return cells + ["", ""]
    b, fl, bw = r["bytes_per_iter"], r["floor_seconds"], r["memory_bandwidth"]
    return cells + [f"{b['reference'] / 1e9:.1f} / {b['ours'] / 1e9:.1f} (copy {bw / 1e9:.0f} GB/s)",
                    f"{fl['reference']['roofline']:.2f} / {fl['ours']['roofline']:.2f}"]
