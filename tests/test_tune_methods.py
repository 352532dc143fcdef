"""experiments/tune_methods.py: every method's search gets the same number of trials, resumes where it stopped (a
new launch folder, the study's finished trials counted) and reports the chosen settings."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import TINY

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "tune_methods.py"


def tune(root: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_search_stopped_part_way_resumes_to_the_same_number_of_trials(tmp_path):
    tiny = [o for o in TINY if not o.startswith("method.")]  # DM has no syn_steps
    common = ["--methods", "dm", "--", *tiny, "method.iterations=3", "logger=none", "protocol.num_seeds=1"]
    tune(tmp_path, "search", "out", "--trials", "1", *common)  # as if stopped after one trial
    tune(tmp_path, "search", "out", "--trials", "2", *common)  # resumed: one more, in a launch of its own
    again = tune(tmp_path, "search", "out", "--trials", "2", *common)  # nothing left
    assert "dm: 2 of 2 trials done (0 failed)" in again.stdout and "+ " not in again.stdout  # nothing run
    launches = sorted((tmp_path / "out" / "dm").glob("launch_*"))
    assert [p.name for p in launches] == ["launch_0", "launch_1"]
    assert [len(list(p.glob("[0-9]*/results.json"))) for p in launches] == [1, 1]
    table = tune(tmp_path, "summary", "out").stdout
    tuned = json.loads((tmp_path / "out" / "tuned.json").read_text())
    assert tuned["dm"]["trials"] == 2 and tuned["dm"]["failed"] == 0
    assert set(tuned["dm"]["settings"]) == {"method.lr_img", "method.lr_txt", "method.lambda_agr", "method.lambda_dis"}
    # the best trial's objective is its students' val r_mean, as its results.json records it
    objectives = [json.loads(r.read_text())["objective"] for p in launches for r in p.glob("[0-9]*/results.json")]
    assert tuned["dm"]["val_r_mean"] == max(objectives)
    assert table.startswith("| method | trials (failed) |") and "| dm | 2 (0) |" in table
