"""`mmdd evaluate` (mmdd.stages.evaluate): one set's students spread over jobs pool into one cell; a killed
evaluation keeps its finished students (the fault-budget script)."""

import json

from conftest import run_in_process
from helpers import ONE_STUDENT, SMALL, TINY_DATA

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, run_mmdd
from helpers import distill


@pytest.mark.slow  # keeps the default suite under 10 minutes; `pytest -m slow`
def test_students_spread_over_jobs_pool_into_the_same_cell(root):
    from mmdd.report.collect import collect

    distill(root, "spread_set", "method.iterations=2")
    syn = root / "outputs/spread_set/synthetic"
    common = ["evaluate", *TINY, "logger=none", f"synthetic={syn}", "protocol.num_seeds=2"]
    run_mmdd([common[0], "-m", *common[1:], "students=0,1", "hydra.sweep.dir=outputs/spread"], root)
    run_mmdd([*common, "hydra.run.dir=outputs/together"], root)
    spread, together = collect([root / "outputs/spread"]), collect([root / "outputs/together"])
    (a,), (b,) = spread.cells, together.cells
    assert len(a.runs) == 2 and a.seeds == "1×2" and b.seeds == "1×2"
    assert a.stats()[0] == b.stats()[0]
    # a 2-iteration set teaches nothing: said once for the set, whether its students ran in one job or two
    assert len(spread.problems) == 1 and spread.problems == together.problems
    assert spread.problems[0].startswith(f"{syn.resolve()}: all 2 students score at chance")
    run_mmdd([common[0], "-m", *common[1:], "protocol.num_seeds=3", "students=0,1", "hydra.sweep.dir=outputs/spread3"],
             root)
    missing = [p for p in collect([root / "outputs/spread3"]).problems if "at chance" not in p]
    assert len(missing) == 1 and "2 of 3 students evaluated (a `students=` job is missing)" in missing[0]
    proc = run_mmdd([*common, "students=2", "hydra.run.dir=outputs/bad_students"], root, check=False)
    assert proc.returncode == 2 and "indices must lie in 0..1" in proc.stderr


@pytest.mark.slow  # about a minute; the figures in the README come from a longer run of the same script
def test_the_fault_budget_script_counts_a_killed_evaluation(tmp_path):
    out = tmp_path / "budget.md"
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "experiments" / "fault_budget.py"),
                           "--trials", "1", "--cases", "evaluate", "--root", str(tmp_path / "w"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in out.read_text().splitlines() if line.startswith("| evaluate (1 process)"))
    assert "| 1/1 | 1/1 |" in row


def test_students_of_other_architectures_evaluate_a_convnet_set(root):
    run_in_process(["distill", "method=pds", *SMALL, "method.restarts=1", "hydra.run.dir=outputs/pds_x"], root,
                   check=True)
    syn = root / "outputs" / "pds_x" / "synthetic"
    data, protocol = TINY_DATA, ONE_STUDENT
    for student, backbone in (("resnet18_minilm", "resnet18"), ("vit_tiny_minilm", "vit_tiny_patch16_224")):
        run_in_process(["evaluate", f"synthetic={syn}", f"model={student}", *data, *protocol,
                        f"hydra.run.dir=outputs/x_{student}"], root, check=True)
        res = json.loads((root / "outputs" / f"x_{student}" / "results.json").read_text())
        assert res["config"]["model"]["image"]["name"] == backbone and res["method"] == "pds"
        assert 0 <= res["mean"]["r_mean"] <= 100


def test_full_train_upper_bound_trains_heads_only_students_on_every_pair(tmp_path):
    data, protocol = TINY_DATA, ONE_STUDENT
    heads = ["model=convnet_heads", "model.image.checkpoint=null"]  # a random frozen backbone (model.image.init_seed)
    run_in_process(["evaluate", "synthetic=full_train", *heads, *data, *protocol, "hydra.run.dir=outputs/full"],
                   tmp_path, check=True)
    res = json.loads((tmp_path / "outputs" / "full" / "results.json").read_text())
    assert res["method"] == "full_train" and res["budget"] == 64 and res["synthetic"] == "full_train"
    history = res["seeds"][0]["history"]
    assert history and 0 <= res["mean"]["r_mean"] <= 100
    refused = run_in_process(["evaluate", "synthetic=full_train", *data, *protocol, "hydra.run.dir=outputs/full2"],
                             tmp_path)
    assert refused.returncode == 2 and "heads-only students" in refused.stderr
