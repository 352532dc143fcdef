"""`mmdd distill`: run a method, save its synthetic set, then (evaluate=true) train its students.

run(cfg) is the stage: the memory check, the data, the distillation (run_distill: the method's set, its manifest,
figures and cost), then the students, spread over the processes of a multi-process run."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

from hydra.utils import instantiate

from mmdd.data.splits import load_annotations, load_data
from mmdd.errors import MmddError
from mmdd.methods.context import MethodContext, check_budget
from mmdd.utils.draws import draws_hooked
from mmdd.utils.io import atomic_write_json, remove_stale_temp_files
from mmdd.data.transforms import denormalize
from mmdd.synthetic.synthetic_set import load_captions
from mmdd.plan import check_distill_fits
from mmdd.report.plots import distillation_curves, pairs_grid
from mmdd.report.table import markdown_table, result_row
from mmdd.stages.evaluate import evaluate_and_print, evaluate_over_ranks
from mmdd.utils.logging import build_loggers, finish_loggers, log_images, log_pairs_table
from mmdd.utils.seed import seed_everything
from mmdd.utils.launch import current
from mmdd.utils.trainer import hardware_record, is_rank_zero

log = logging.getLogger(__name__)


def distill_stats(history: list[dict], warmup: int = 2) -> dict:
    if not history:
        return {}
    times = [h["distill/sec_per_iter"] for h in history]
    steady = times[warmup:] or times
    return {
        "iterations": len(history),
        "sec_per_iter_median": statistics.median(steady),
        "peak_mem_mb": max(h["distill/peak_mem_mb"] for h in history),
        "peak_reserved_mb": max((h["distill/peak_reserved_mb"] for h in history if "distill/peak_reserved_mb" in h),
                                default=None),  # GPU only
        "final_matching_loss": history[-1]["distill/matching_loss"],
    }


def distill_cost(cfg, result, wall_seconds: float) -> dict:
    """What the set cost: the distillation's wall time (this process's, plus the iterations of earlier runs it
    resumed from, whose setup time is not known), its device and iterations, the training of the store's experts
    it read (`mmdd table`'s cost column), and what it takes to store, in floats (images, texts, S, step sizes)."""
    from mmdd.teachers.expert_records import teacher_cost
    from mmdd.utils.trainer import device_label

    teachers = (teacher_cost(str(cfg.buffer_dir), result.teacher_experts) if result.teacher_experts
                else {"experts": 0, "seconds": 0.0, "device": None})
    sets = [*result.earlier_phases, result.synthetic]  # a phased set stores every phase
    storage = {"pairs": sum(len(s) for s in sets), "images": sum(s.images.numel() for s in sets),
               "texts": sum(s.texts.numel() for s in sets),
               "similarity": sum(p.numel() for s in sets if s.similarity is not None for p in s.similarity.parameters()),
               "step_sizes": sum(p.numel() for s in sets for p in s.lrs.parameters())}
    storage["floats"] = sum(v for k, v in storage.items() if k != "pairs")
    return {"distill_seconds": wall_seconds + result.earlier_seconds, "device": device_label(cfg.hardware),
            "iterations": len(result.history), "teachers": teachers, "storage": storage}


def complete_selection(method, cfg, out_dir: Path) -> bool:
    """Whether out_dir holds a learning-free method's set saved complete by this same configuration (a rerun of a
    sweep: PDS's k-means or forgetting's training need not run again). Learned methods resume from their checkpoint
    instead; resume=false recomputes."""
    from mmdd.errors import ArtifactError
    from mmdd.methods.context import Resume
    from mmdd.synthetic.synthetic_set import SyntheticSet
    from mmdd.utils.config import config_hash

    if method.learned or Resume.of(cfg.resume).fresh:
        return False
    if not (out_dir / "manifest.json").exists():
        return False
    try:
        _, manifest = SyntheticSet.load(out_dir)
    except ArtifactError:  # unreadable: made again
        return False
    return bool(manifest.get("complete")) and manifest.get("config_hash") == config_hash(cfg)


def run_distill(cfg, data=None, out_dir: str | Path | None = None, method=None) -> Path:
    """Synthesize the set with `cfg.method` (or `method`, built from it); returns the directory it was saved to."""
    method = method or instantiate(cfg.method)  # its settings checked before any data is read
    seed_everything(cfg.seed)
    if data is None:
        annotations = load_annotations(cfg.data)
        check_budget(cfg.budget, annotations["train"])  # before the captions are embedded (minutes at real size)
        data = load_data(cfg, splits=("train",), annotations=annotations)
    out_dir = Path(out_dir or cfg.synthetic_dir)
    for folder in (out_dir, out_dir / "checkpoint"):  # temp files of a run killed while writing (a rerun resumes)
        remove_stale_temp_files(folder)
    if draws_hooked(cfg) and not method.takes_draws:
        raise MmddError(f"draws.record / draws.replay apply to trajectory-matching methods; method={cfg.method.name} "
                        "takes no draws from them: unset draws")
    if complete_selection(method, cfg, out_dir):
        log.info("%s: the set in %s is complete and was made by this same configuration; reused (resume=false "
                 "selects again)", cfg.method.name, out_dir)
        return out_dir
    loggers = build_loggers(cfg, job_type="distill", name=f"{cfg.method.name}_b{cfg.budget}_s{cfg.seed}")
    try:
        t0 = time.perf_counter()
        context = MethodContext.of(cfg, data["train"], out_dir, loggers)
        result = method.synthesize(context)
        if not is_rank_zero():
            return out_dir  # rank 0 of a multi-process run writes the set
        syn, history = result.synthetic, result.history
        wall = time.perf_counter() - t0
        stats = {**distill_stats(history), "total_seconds": wall, "cost": distill_cost(cfg, result, wall)}
        extra = {"complete": True, "iteration": len(history), "distill_stats": stats,
                 "backbone_fingerprint": result.backbone_fingerprint, "hardware": hardware_record(cfg.hardware)}
        if result.diagnostics:
            extra["diagnostics"] = result.diagnostics  # modality collapse: real / initial / final
        if result.resumes:
            extra["resumed"] = result.resumes  # from which iterations, with which outer settings changed
        if method.computed_with():
            extra["computed_with"] = method.computed_with()  # e.g. TESLA's pass 2: forward mode or double backward
        if method.variant():
            extra["variant"] = method.variant()  # e.g. DM's augmentation and what it matches
        context.save_set(syn, method.manifest_fields(), extra)
        figures = [out_dir / "grid.png"]
        captions = load_captions(out_dir) or []
        if history:
            atomic_write_json(out_dir / "history.json", history)
            figures.append(distillation_curves(history, out_dir / "curves.png"))
        if captions:
            figures.append(pairs_grid(syn.images, captions, cfg.data.mean, cfg.data.std, out_dir / "pairs.png"))
        for fig in figures:
            log_images(loggers, f"synthetic/{fig.stem}", [str(fig)])
        n = min(len(syn), cfg.log_pairs)
        pics = denormalize(syn.images[:n].detach().cpu(), cfg.data.mean, cfg.data.std).permute(0, 2, 3, 1).numpy()
        log_images(loggers, "synthetic/pairs", list(pics), captions[:n] or None)
        if captions:
            log_pairs_table(loggers, "synthetic/pairs_table", list(pics), captions[:n])
        log.info("synthetic set (%s, budget %d) saved to %s; %s", cfg.method.name, cfg.budget, out_dir, stats)
    finally:
        finish_loggers(loggers)
    return out_dir


def run(cfg) -> float | None:
    started = time.time()
    method = instantiate(cfg.method)  # a wrong setting is a sentence in a second, before any data
    check_distill_fits(cfg, method)  # on a GPU: a cell that cannot fit stops here, before any data, naming what fits
    data = load_data(cfg) if cfg.evaluate else None  # train for distilling, val/test for the students after
    syn_dir = run_distill(cfg, data, method=method)
    launch = current()
    if cfg.evaluate and launch.world_size > 1:
        # Every process trains its share of the students on its own device; process 0 gathers and prints them
        results = evaluate_over_ranks(cfg, syn_dir, data, launch.global_rank, launch.world_size, since=started)
        if results is None:
            return None
        print(f"synthetic set: {syn_dir}")
        print(markdown_table([result_row(results)]))
        return results["objective"]
    if not is_rank_zero():
        return None  # the other processes of a multi-process distillation stop here
    print(f"synthetic set: {syn_dir}")
    return evaluate_and_print(cfg, syn_dir, data) if cfg.evaluate else None
