"""`mmdd run`: generate -> buffer -> distill -> evaluate (distilled and baselines) -> table."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from mmdd.data.splits import load_data
from mmdd.plan import check_distill_fits
from mmdd.report.collect import teacher_results
from mmdd.report.table import markdown_table, result_row
from mmdd.stages.buffer import run_buffer
from mmdd.stages.distill import run_distill
from mmdd.stages.evaluate import run_evaluate, summarize
from mmdd.stages.pretrain import run_pretrain
from mmdd.teachers.expert_records import expert_metrics
from mmdd.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def with_method(cfg, method_cfg):
    """A copy of `cfg` whose `method` is `method_cfg` (a baseline composed into cfg.baselines)."""
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(new):
        new.method = OmegaConf.create(OmegaConf.to_container(method_cfg, resolve=True))
    return new


def run_all(cfg) -> dict:
    out = Path(str(cfg.paths.output_dir))
    method = instantiate(cfg.method)  # a wrong setting is a sentence before any data
    check_distill_fits(cfg, method)  # on a GPU: a distillation that cannot fit stops here, before any data
    data = load_data(cfg)
    ckpt = cfg.model.image.get("checkpoint")
    if ckpt and str(ckpt) == str(cfg.pretrain.output):
        run_pretrain(cfg, data)  # a frozen-backbone model whose backbone this project pre-trains
    store = run_buffer(cfg, data)
    rows = []

    syn_dir = run_distill(cfg, data, out / "synthetic" / str(cfg.method.name), method=method)
    res = run_evaluate(cfg, syn_dir, data, out / "evaluate" / str(cfg.method.name))
    rows.append(result_row(res))
    for name, method_cfg in cfg.baselines.items():
        bcfg = with_method(cfg, method_cfg)
        bdir = run_distill(bcfg, data, out / "synthetic" / str(name))
        bres = run_evaluate(bcfg, bdir, data, out / "evaluate" / str(name))
        rows.append(result_row(bres))

    experts = {e: m["test"] for e, m in expert_metrics(store).items() if "test" in m}
    teachers = teacher_results(str(cfg.data.name), str(store), experts, data["train"].num_images) if experts else None
    if teachers:
        mean, std = summarize(teachers["seeds"])
        rows.append({"method": teachers["label"], "budget": teachers["budget"], "n": len(experts), "mean": mean, "std": std})

    table = markdown_table(rows)
    atomic_write_text(out / "table.md", table + "\n")
    # `teachers` lets `mmdd table` show the same full-data row as table.md.
    atomic_write_json(out / "summary.json", {"rows": rows, "trajectory_store": str(store), "teachers": teachers})
    print(f"\nTest retrieval on {cfg.data.name} (protocol {cfg.protocol.name}: checkpoint chosen on val, "
          f"mean ± std over seeds; 'seeds' = students, or experts for the full-data row)\n")
    print(table)
    print(f"\nOutputs: {out}")
    if (out / "wandb").exists():
        print(f"W&B runs (offline): {out / 'wandb'}; upload with `wandb sync {out / 'wandb'}/offline-run-*`")
    return {"rows": rows, "table": table, "out": str(out), "objective": res["objective"]}


def run(cfg) -> float | None:
    return run_all(cfg)["objective"]
