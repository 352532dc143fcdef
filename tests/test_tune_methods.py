"""experiments/tune_methods.py: every method's search gets the same number of trials, resumes where it stopped (a
new launch folder, the study's finished trials counted) and reports the chosen settings."""

import csv
import io
import json
import subprocess
from pathlib import Path

import yaml

from conftest import TINY, call_in, experiment_script


def tune(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`python experiments/tune_methods.py ARGS` run from `root`, in this process (its trials are the real `mmdd`
    CLI's multiruns, in processes of their own)."""
    proc = call_in(root, list(args), script().main, list(args))
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
    # the resumed launch's sampler is seeded by the study's trial count, so it does not redraw the first setting
    # (seeded alike, TPE's random start-up draws repeat: a resumed search would rerun what it has run)
    seeds = [yaml.safe_load((p / "0" / ".hydra" / "hydra.yaml").read_text())["hydra"]["sweeper"]["sampler"]["seed"]
             for p in launches]
    assert seeds == ["${seed}", 1]  # the first launch keeps the sweep's own (the run's seed, 0)
    drawn = [(p / "0" / ".hydra" / "overrides.yaml").read_text().splitlines() for p in launches]
    settings = [sorted(line for line in d if "method.lr_" in line or "method.lambda" in line) for d in drawn]
    assert settings[0] and settings[0] != settings[1]
    table = tune(tmp_path, "summary", "out").stdout
    tuned = json.loads((tmp_path / "out" / "tuned.json").read_text())
    assert tuned["dm"]["trials"] == 2 and tuned["dm"]["failed"] == 0
    assert set(tuned["dm"]["settings"]) == {"method.lr_img", "method.lr_txt", "method.lambda_agr", "method.lambda_dis"}
    # the best trial's objective is its students' val r_mean, as its results.json records it
    objectives = [json.loads(r.read_text())["objective"] for p in launches for r in p.glob("[0-9]*/results.json")]
    assert tuned["dm"]["val_r_mean"] == max(objectives)
    assert table.startswith("| search | trials (failed) |") and "| dm | 2 (0) |" in table
    assert tuned["dm"]["method"] == "dm" and tuned["dm"]["search_seconds"] > 0
    assert tuned["dm"]["superseded_trials"] == 0 and isinstance(tuned["dm"]["at_edges"], list)
    assert tuned["dm"]["chosen_in"] == ""  # no earlier search
    assert not (tmp_path / "out" / "stages").exists()  # DM reads no store: none was trained for its search


def script():
    """experiments/tune_methods.py as a module (its functions on real studies, without launching runs)."""
    return experiment_script("tune_methods")


def write_study(folder: Path, method: str, trials: list[tuple[dict, float | None, float]]) -> None:
    """A real Optuna study in folder/study.db, as a search leaves it: (params, val r_mean or None for a failed trial,
    seconds) per trial."""
    import datetime

    import optuna
    from optuna.distributions import LogUniformDistribution
    from optuna.trial import FrozenTrial, TrialState

    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=method, storage=f"sqlite:///{folder / 'study.db'}", direction="maximize")
    start = datetime.datetime(2026, 12, 1)
    for number, (params, value, seconds) in enumerate(trials):
        study.add_trial(FrozenTrial(
            number=number, state=TrialState.COMPLETE if value is not None else TrialState.FAIL, value=value,
            datetime_start=start, datetime_complete=start + datetime.timedelta(seconds=seconds), params=params,
            distributions={k: LogUniformDistribution(1e-3, 1e4) for k in params}, user_attrs={}, system_attrs={},
            intermediate_values={}, trial_id=number))


def test_a_superseded_search_is_kept_whole_counted_and_its_best_trial_can_still_be_chosen(tmp_path):
    """The edge rule's second search: `--supersede` keeps the first whole (resumes instead when the study already runs
    over the current ranges), and `summary` counts both searches' trials and cost and chooses the best val trial of
    either, saying which search ran it."""
    tune_methods = script()
    from mmdd.report.tuning import search_ranges

    out, dm = tmp_path / "out", tmp_path / "out" / "dm"
    first = {"method.lr_img": 1.1, "method.lr_txt": 0.1}
    write_study(dm, "dm", [(first, 3.5, 60.0), ({"method.lr_img": 30.0, "method.lr_txt": 0.1}, 2.0, 60.0),
                           ({"method.lr_img": 5000.0, "method.lr_txt": 0.1}, None, 5.0)])
    (dm / "launch_0" / "0").mkdir(parents=True)
    narrower = {**search_ranges("dm"), "method.lr_img": "tag(log, interval(1, 100))"}  # as before the yaml's extension
    (dm / "space.json").write_text(json.dumps(narrower))
    assert tune_methods.spent(out, "dm") == (3, 1)

    tune_methods.supersede(out, "dm")
    kept = dm / "superseded" / "0"
    assert sorted(p.name for p in kept.iterdir()) == ["launch_0", "space.json", "study.db"]
    assert sorted(p.name for p in dm.iterdir()) == ["superseded"] and tune_methods.spent(out, "dm") == (0, 0)
    # the second search, over the current ranges; superseding again (the same command rerun) resumes it instead
    write_study(dm, "dm", [({"method.lr_img": 0.2, "method.lr_txt": 0.5}, 3.0, 40.0)])
    (dm / "space.json").write_text(json.dumps(search_ranges("dm")))
    tune_methods.supersede(out, "dm")
    assert [p.name for p in (dm / "superseded").iterdir()] == ["0"] and tune_methods.spent(out, "dm") == (1, 0)

    tuned = tune_methods.summary(out)["dm"]
    assert (tuned["trials"], tuned["failed"], tuned["superseded_trials"]) == (1, 0, 3)
    assert tuned["search_seconds"] == 165.0  # every trial of both searches, the failed one included
    # the first search's best (3.5) beats the second's (3.0): chosen, and not at an edge of the extended range
    assert (tuned["val_r_mean"], tuned["settings"], tuned["chosen_in"]) == (3.5, first, "superseded/0")
    assert tuned["at_edges"] == []
    write_study(tmp_path / "other", "dm", [])  # an empty study (created, no trial yet) is not a search
    assert tune_methods.study(tmp_path / "other", "dm") is not None and tune_methods.study(tmp_path / "none", "dm") is None


def test_a_repeated_draw_is_not_a_trial_but_its_time_is_spent(tmp_path):
    """A search resumed before its sampler's start-up draws were done redrew settings it had run (before resumed
    launches were reseeded): such a repeat is not counted as a trial (a search gets 12 distinct settings), nor as a
    failure, while its wall time counts in the search's cost and the table says how many there were."""
    tune_methods = script()
    from mmdd.report.table import searches_table
    from mmdd.report.tuning import Search

    out, dm = tmp_path / "out", tmp_path / "out" / "dm"
    a, b = {"method.lr_img": 1.1, "method.lr_txt": 0.1}, {"method.lr_img": 30.0, "method.lr_txt": 0.1}
    write_study(dm, "dm", [(a, None, 10.0), (b, 2.0, 60.0), (a, None, 10.0), (b, 2.0, 60.0), ({"method.lr_img": 5.0,
                                                                                                "method.lr_txt": 0.2}, 3.0, 60.0)])
    assert tune_methods.spent(out, "dm") == (3, 1)  # a (failed), b, and the third setting
    tuned = tune_methods.summary(out)["dm"]
    assert (tuned["trials"], tuned["failed"], tuned["repeated_trials"]) == (3, 1, 2)
    assert tuned["search_seconds"] == 200.0 and tuned["val_r_mean"] == 3.0
    search = Search.from_record("dm", tuned)
    assert "| dm | 3 (1) +2 repeated |" in searches_table([search])
    assert search.cell().startswith("dm: 3 trials, 1 failed (+2 repeated draws); val 3.00")


def test_a_chosen_value_within_a_third_of_a_decade_of_a_log_ranges_edge_is_reported():
    """The edge rule, on hand-placed values: log ranges only (a weight's linear range and a choice never), either edge,
    the threshold exclusive; the real search spaces parse."""
    from mmdd.report.tuning import at_edges, search_space

    space = search_space("dm")  # lr_img log [0.1, 100], lr_txt log [0.01, 1], lambda_agr/dis linear [0, 2]
    assert at_edges(space, {"method.lr_img": 0.2, "method.lr_txt": 0.1, "method.lambda_agr": 0.0}) == [
        "method.lr_img (lower edge)"]  # 0.2 is 0.30 decades above 0.1; the weight at 0 is a linear range's edge
    assert at_edges(space, {"method.lr_img": 0.25, "method.lr_txt": 0.5}) == [
        "method.lr_txt (upper edge)"]  # 0.25: 0.40 decades in; 0.5: 0.30 below 1
    assert at_edges(space, {"method.lr_img": 10.0}) == []
    assert at_edges(space, {"method.lr_img": 0.1 * 10 ** (1 / 3 - 0.01)}) == ["method.lr_img (lower edge)"]
    assert at_edges(space, {"method.lr_img": 0.1 * 10 ** (1 / 3 + 0.01)}) == []
    assert at_edges(space, {"method.lr_img": 0.1 * 10 ** 0.25}, decades=0.2) == []  # the threshold is a parameter
    lors = search_space("lors")
    assert at_edges(lors, {"method.temperature": 0.03, "method.similarity.rank": 5}) == []  # choices: bounded as listed


def test_the_table_marks_the_rows_run_at_a_searchs_chosen_settings(tmp_path, capsys, monkeypatch):
    """`mmdd table --tuned`: a row launched with `overrides`' chosen settings is that search's tuned row (its trials, the
    chosen trial's val r_mean and the search's cost); a row at other settings is not tuned; a broken record is refused
    with a message."""
    from conftest import run_in_process, run_mmdd
    from mmdd.report.tuning import override_of

    out = tmp_path / "out"
    out.mkdir()
    settings = {"method.lr_img": 12.3456789, "method.lambda_agr": 0.5}
    (out / "tuned.json").write_text(json.dumps({"dm": {"method": "dm", "trials": 12, "failed": 2, "val_r_mean": 3.25,
                                                       "settings": settings, "search_seconds": 1500.0,
                                                       "superseded_trials": 12, "at_edges": ["method.lr_img (upper edge)"],
                                                       "chosen_in": "superseded/0"}}))
    chosen = tune(tmp_path, "overrides", "out", "dm").stdout.split()
    # the marker first (a record, not a setting), then the chosen settings as the final runs are launched with them
    assert chosen == ["tuned_from=dm", "method.lambda_agr=0.5", "method.lr_img=12.3457"]
    assert chosen[1:] == [override_of(k, v) for k, v in sorted(settings.items())]
    # DM has no syn_steps; one num_seeds only (a multirun keeps the last value of a key, a single run records both)
    tiny = [o for o in TINY if not o.startswith(("method.", "protocol.num_seeds"))]
    common = [*tiny, "method.iterations=2", "logger=none", "protocol.num_seeds=1", "method=dm"]
    # single runs in this process (they record their overrides as the CLI's do); the multirun below is the CLI's own
    run_in_process(["distill", *common, *chosen[1:], "hydra.run.dir=runs/tuned"], tmp_path, check=True)  # no marker
    run_in_process(["distill", *common, "method.lr_img=1", "hydra.run.dir=runs/other"], tmp_path, check=True)
    # an ablation as compare_methods.sh launches it: a multirun from the search (its marker) with a chosen key
    # overridden on top; Hydra's sweeper keeps only the last value of a key, so the record lacks the chosen one
    run_mmdd(["distill", "-m", *common, *chosen, "method.lambda_agr=0", "hydra.sweep.dir=runs/ablation"], tmp_path)
    recorded = json.loads(next((tmp_path / "runs" / "ablation").glob("*/results.json")).read_text())["overrides"]
    assert "method.lambda_agr=0.5" not in recorded and "method.lambda_agr=0" in recorded
    from mmdd.commands import table as table_command

    monkeypatch.chdir(tmp_path)  # `mmdd table` in this process (the runs above are the CLI's own)

    def table(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = table_command(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, text, _ = table("runs", "--tuned", "out/tuned.json")
    assert code == 0
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| synscenes")}
    # a tuned row is named by its method (the tuning column stands for the chosen settings), plus what runs on top
    assert set(rows) == {"dm", "dm (method.lambda_agr=0)", "dm (method.lr_img=1)"}
    tuned, other, ablation = rows["dm"], rows["dm (method.lr_img=1)"], rows["dm (method.lambda_agr=0)"]
    assert ablation.split(" | ")[-2:] == tuned.split(" | ")[-2:]
    assert tuned.endswith("| dm: 12 trials, 2 failed (+12 over narrower ranges); val 3.25 (a trial over the narrower "
                          "ranges); at a range edge: method.lr_img (upper edge) | 25.0 min |")
    assert other.endswith("| not tuned | – |")
    # the chosen values, once per search, under the table
    assert ("| dm | 12 (2) +12 superseded | 3.25 (superseded/0) | 25.0 min | method.lambda_agr=0.5 "
            "method.lr_img=12.3457 | method.lr_img (upper edge) |") in text
    assert "tuned on val" in text
    code, csv_text, _ = table("runs", "--tuned", "out/tuned.json", "-f", "csv")
    assert code == 0
    csv_rows = list(csv.DictReader(io.StringIO(csv_text)))
    row = next(r for r in csv_rows if r["tuned_search"] == "dm")
    assert (row["tuned_trials"], row["tuned_superseded_trials"], row["tuned_chosen_in"], row["tuned_at_edges"],
            row["search_seconds"]) == ("12", "12", "superseded/0", "method.lr_img (upper edge)", "1500.0")
    (out / "broken.json").write_text(json.dumps({"dm": {"trials": 1}}))
    code, _, err = table("runs", "--tuned", "out/broken.json")
    assert code == 2 and "lacks 'method'" in err
