"""experiments/parity's timing of the official loops: what bounds an iteration there (official.py's Timer) and the
table of records (timing.py); mmdd's side of the comparison, `distill/wall_sec_per_iter`, is in test_end_to_end."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "parity"))
from official import Timer  # noqa: E402
from timing import markdown_table  # noqa: E402


def test_timer_bounds_each_iteration_by_the_scripts_progress_log_and_finish():
    timer = Timer()
    wandb = timer.wandb()
    run = wandb.init(project="x")
    for it in range(3):
        wandb.log({"Progress": it}, step=it)
        wandb.log({"Loss/grand": 1.0}, step=it)  # other logs bound nothing
        time.sleep(0.02 * (it + 1))
    wandb.finish()
    assert run.name == "timing" and [i for i, _ in timer.starts] == [0, 1, 2]
    seconds = timer.seconds()
    assert len(seconds) == 3  # the last iteration ends at finish
    for it, s in enumerate(seconds):
        assert 0.02 * (it + 1) <= s < 0.02 * (it + 1) + 0.5


def test_timer_counts_the_flops_of_the_last_iteration_only():
    timer = Timer(count_flops=True)
    wandb = timer.wandb()
    a = torch.randn(64, 64)
    wandb.log({"Progress": 0})
    a @ a @ a  # two products: not the last iteration's
    wandb.log({"Progress": 1})
    a @ a
    wandb.finish()
    assert timer.costs["flops"] == 2 * 64**3
    assert timer.costs["bytes"] == 3 * 64 * 64 * 4  # the product's two operands read, its result written


def _record(method, ratio_official, mmdd, heap="os", flops=True):
    r = {"method": method, "budget": 100, "pairs": 99, "sec_per_iter": {"official": ratio_official, "mmdd": mmdd},
         "ratio": ratio_official / mmdd, "round_ratios": [2.0, 2.5], "peak_rss_mb": {"official": 4000, "mmdd": 3000},
         "official_cpu_heap": heap}
    if flops:
        r.update(flops_per_iter={"official": 150e9, "mmdd": 90e9}, matmul_peak_flops=150e9,
                 bytes_per_iter={"official": 60e9, "mmdd": 20e9}, memory_bandwidth=20e9,
                 floor_seconds={"official": {"roofline": 3.2}, "mmdd": {"roofline": 1.5}})
    return r


def test_the_table_of_records_names_each_cell_and_its_floor():
    table = markdown_table([_record("repblend", 4.0, 2.0), _record("lors", 16.0, 10.0, heap="keep", flops=False)])
    head, rule, rb, lors = table.splitlines()
    assert head.count("|") == rule.count("|") == rb.count("|") == lors.count("|")
    assert rb.startswith("| repblend | 100 (99 pairs) | 4.00 | 2.00 | 2.00x | 2.00, 2.50 | 4000 / 3000 | 150.0 / 90.0 |")
    assert "25% / 30% of 150 GFLOP/s | 0.60 |" in rb  # 150 GFLOP in 4 s of a 150 GFLOP/s peak; 90 GFLOP at the peak
    assert rb.endswith("| 60.0 / 20.0 (copy 20 GB/s) | 3.20 / 1.50 | 80% / 75% |")  # floor / measured s/iter
    assert lors.startswith("| lors (official with cpu_heap keep) | 100 (99 pairs) | 16.00 | 10.00 | 1.60x |")
