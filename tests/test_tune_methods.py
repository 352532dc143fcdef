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
    assert table.startswith("| search | trials (failed) |") and "| dm | 2 (0) |" in table
    assert tuned["dm"]["method"] == "dm" and tuned["dm"]["search_seconds"] > 0


def test_the_table_marks_the_rows_run_at_a_searchs_chosen_settings(tmp_path):
    """`mmdd table --tuned`: a row launched with `overrides`' chosen settings is that search's tuned row (its trials, the
    chosen trial's val r_mean and the search's cost); a row at other settings is not tuned; a broken record is refused
    with a message."""
    from conftest import run_mmdd
    from mmdd.report.tuning import override_of

    out = tmp_path / "out"
    out.mkdir()
    settings = {"method.lr_img": 12.3456789, "method.lambda_agr": 0.5}
    (out / "tuned.json").write_text(json.dumps({"dm": {"method": "dm", "trials": 12, "failed": 2, "val_r_mean": 3.25,
                                                       "settings": settings, "search_seconds": 1500.0}}))
    chosen = tune(tmp_path, "overrides", "out", "dm").stdout.split()
    assert chosen == ["method.lambda_agr=0.5", "method.lr_img=12.3457"] == [override_of(k, v) for k, v in
                                                                          sorted(settings.items())]
    tiny = [o for o in TINY if not o.startswith("method.")]
    common = [*tiny, "method.iterations=2", "logger=none", "protocol.num_seeds=1", "method=dm"]
    run_mmdd(["distill", *common, *chosen, "hydra.run.dir=runs/tuned"], tmp_path)
    run_mmdd(["distill", *common, "method.lr_img=1", "hydra.run.dir=runs/other"], tmp_path)
    table = run_mmdd(["table", "runs", "--tuned", "out/tuned.json"], tmp_path).stdout
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| synscenes")}
    tuned, other = rows["dm (method.lambda_agr=0.5 method.lr_img=12.3457)"], rows["dm (method.lr_img=1)"]
    assert tuned.endswith("| 12 trials, 2 failed; val 3.25 | 25.0 min |") and other.endswith("| not tuned | – |")
    assert "tuned on val" in table
    (out / "broken.json").write_text(json.dumps({"dm": {"trials": 1}}))
    proc = run_mmdd(["table", "runs", "--tuned", "out/broken.json"], tmp_path, check=False)
    assert proc.returncode == 2 and "lacks 'method'" in proc.stderr
