"""The users' jobs end to end on tiny data: a seeds x methods multirun, `mmdd table` over it (files and
W&B offline runs), an Optuna sweep, `mmdd export` of a distilled set read back by the pairs loader."""

import json
import logging

import pytest

from conftest import TINY, run_command, run_in_process, run_mmdd


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    run_in_process(["buffer", *TINY, "logger=none", "hydra.run.dir=outputs/buffer"], root, check=True)
    proc = run_mmdd(["distill", "-m", *TINY, "method=mtt_vl,tesla_vl", "seed=0,1", "protocol.num_seeds=1",
                     "hydra.sweep.dir=outputs/grid"], root)
    return root, proc


def test_multirun_writes_results_with_config_per_job(grid):
    root, _ = grid
    jobs = sorted((root / "outputs" / "grid").glob("[0-9]*"))
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        res = json.loads((job / "results.json").read_text())
        assert res["complete"] is True and res["num_seeds"] == 1
        assert res["config"]["method"]["name"] == res["method"] and res["config"]["seed"] == res["seed"]
        assert res["config_hash"] and res["objective"] is not None  # val r_mean for sweepers
        diag = json.loads((job / "synthetic" / "manifest.json").read_text())["diagnostics"]
        assert {"real", "initial", "final"} <= set(diag) and "modality_gap" in diag["final"]
        assert (job / "synthetic" / "curves.png").exists() and (job / "synthetic" / "pairs.png").exists()
        seen.add((res["method"], res["seed"]))
    assert seen == {("mtt_vl", 0), ("mtt_vl", 1), ("tesla_vl", 0), ("tesla_vl", 1)}
    # both seeds used the one trajectory store (teacher.seed, not the run's seed)
    assert len(list((root / "outputs" / "artifacts" / "buffers" / "synscenes").iterdir())) == 1


def test_same_seed_same_result_on_cpu(grid):
    root, _ = grid
    job0 = json.loads((root / "outputs" / "grid" / "0" / "results.json").read_text())
    run_in_process(["distill", *TINY, "method=mtt_vl", "seed=0", "protocol.num_seeds=1", "logger=none",
                    "hydra.run.dir=outputs/again"], root, check=True)
    again = json.loads((root / "outputs" / "again" / "results.json").read_text())
    assert job0["method"] == "mtt_vl" and job0["seed"] == 0
    assert again["mean"] == job0["mean"]


def test_table_over_the_multirun_with_anchors_and_wandb(grid, tmp_path):
    root, _ = grid
    proc = run_command(["table", "outputs/grid", "--anchors", "flickr30k", "--plot", str(tmp_path / "budget.png"),
                        "-o", str(tmp_path / "t.md")], root)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    mtt = next(line for line in lines if "| mtt_vl |" in line)
    assert "| 8 | mmdd | 2×1 |" in mtt  # budget, protocol, 2 distillation seeds x 1 student
    assert (tmp_path / "budget.png").exists() and (tmp_path / "t.md").read_text().strip() == proc.stdout.strip()
    # the same cells from the W&B offline runs of the students
    proc = run_command(["table", "--wandb", "outputs/grid", "-f", "csv"], root)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines()[1:] if line]
    assert len(rows) == 2 and all(",2×1," in r for r in rows)


def test_optuna_sweep_runs_trials_on_val_and_goes_on_past_a_failed_one(grid):
    """The first trial (the seeded sampler's draw) takes lr_img 1e30: its set diverges, the trial is recorded as
    failed with mmdd's message, and the search goes on to its other trials and a best one."""
    root, _ = grid
    proc = run_mmdd(["distill", *TINY, "sweep=mtt_vl", "hydra.sweeper.n_trials=2", "logger=none",
                     "method.lr_img=choice(10,1e30)", "hydra.sweep.dir=outputs/sweep"], root)
    best = (root / "outputs" / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in best and "method.lr_img: 10" in best and "best_value" in best
    assert "Lower the outer learning rates" in proc.stderr
    assert not (root / "outputs" / "sweep" / "0" / "results.json").exists()


def test_export_of_a_distilled_set_loads_as_a_dataset(grid):
    root, _ = grid
    syn = root / "outputs" / "grid" / "0" / "synthetic"
    proc = run_command(["export", str(syn), "outputs/exported"], root)
    assert "data=pairs_table" in proc.stdout
    rows = (root / "outputs" / "exported" / "captions.jsonl").read_text().splitlines()
    assert len(rows) == 8 and json.loads(rows[0])["image"] == "images/00000.png"


def test_interrupted_evaluation_keeps_finished_seeds(grid, caplog):
    root, _ = grid
    syn = root / "outputs" / "grid" / "0" / "synthetic"
    args = ["evaluate", *TINY, "logger=none", f"synthetic={syn}", "hydra.run.dir=outputs/resume"]
    run_in_process(args, root, check=True)
    path = root / "outputs" / "resume" / "results.json"
    full = json.loads(path.read_text())
    # as a run killed after its first student leaves it: one seed, complete false
    partial = {**full, "seeds": full["seeds"][:1], "num_seeds": 1, "complete": False}
    path.write_text(json.dumps(partial))
    with caplog.at_level(logging.INFO, logger="mmdd"):
        run_in_process(args, root, check=True)
    assert "resuming, 1 of 2 student seeds" in caplog.text
    again = json.loads(path.read_text())
    assert again["complete"] is True and again["mean"] == full["mean"]
