"""`mmdd table`: aggregation over written results.json files, formats, anchors, missing and partial runs."""

import csv
import io
import json
import statistics

import pytest

from mmdd.commands import table as table_command
from mmdd.evaluate.retrieval import METRIC_KEYS
from mmdd.report.collect import collect, variant_of
from mmdd.report.table import render, rows_from_cells


def metrics(v: float) -> dict:
    return {k: v for k in METRIC_KEYS}


def write_results(path, method, budget, students, seed=0, expected=None, complete=True, overrides=(), dataset="synscenes",
                  cost=None):
    path.mkdir(parents=True, exist_ok=True)
    res = {
        "label": method, "method": method, "budget": budget, "dataset": dataset, "seed": seed,
        "protocol": {"name": "mmdd"}, "complete": complete, "expected_seeds": expected or len(students),
        "num_seeds": len(students), "seeds": [{"seed": i, "test": metrics(v)} for i, v in enumerate(students)],
        "overrides": list(overrides), "synthetic": str(path / "synthetic"),
    }
    if cost is not None:
        res["distill_stats"] = {"cost": cost}
    (path / "results.json").write_text(json.dumps(res))


def test_cells_pool_every_student_of_every_run(tmp_path):
    write_results(tmp_path / "a" / "0", "lors", 100, [1.0, 2.0], seed=0)
    write_results(tmp_path / "a" / "1", "lors", 100, [3.0, 6.0], seed=1)
    write_results(tmp_path / "b", "mtt_vl", 100, [2.0, 2.0], seed=0)
    write_results(tmp_path / "b2", "mtt_vl", 100, [4.0, 4.0], seed=1)
    col = collect([tmp_path])
    assert [c.method for c in col.cells] == ["lors", "mtt_vl"]
    lors = col.cells[0]
    mean, std = lors.stats()
    assert mean["r_mean"] == pytest.approx(3.0)
    assert std["r_mean"] == pytest.approx(statistics.stdev([1, 2, 3, 6]))
    assert lors.seeds == "2×2"
    assert col.problems == []
    # across distillation seeds: the std of the sets' means (1.5 and 4.5), the mean unchanged
    mean_sets, std_sets = lors.stats("sets")
    assert mean_sets == mean and std_sets["r_mean"] == pytest.approx(statistics.stdev([1.5, 4.5]))
    mtt = col.cells[1]
    assert mtt.stats("sets")[1]["r_mean"] == pytest.approx(statistics.stdev([2.0, 4.0]))
    assert mtt.stats()[1]["r_mean"] == pytest.approx(statistics.stdev([2, 2, 4, 4]))
    write_results(tmp_path / "c", "random", 100, [1.0, 3.0])  # one set: no spread across seeds
    random_cell = next(c for c in collect([tmp_path]).cells if c.method == "random")
    assert random_cell.stats("sets")[1] is None and random_cell.stats()[1] is not None


def test_table_says_what_its_spread_is(tmp_path, capsys):
    write_results(tmp_path / "a" / "0", "lors", 100, [1.0, 2.0], seed=0)
    write_results(tmp_path / "a" / "1", "lors", 100, [3.0, 6.0], seed=1)
    assert table_command([str(tmp_path)]) == 0
    default = capsys.readouterr().out
    assert "3.00 ± 2.16" in default and "every student evaluation" in default
    assert table_command([str(tmp_path), "--spread", "sets", "-f", "csv"]) == 0
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["r_mean_std"] == "2.1213" and row["std_over"] == "sets"
    assert table_command([str(tmp_path), "--spread", "sets"]) == 0
    assert "across distillation seeds" in capsys.readouterr().out


def test_missing_and_partial_runs_are_reported_not_dropped(tmp_path):
    write_results(tmp_path / "ok0", "lors", 100, [1.0, 2.0, 3.0], seed=0)
    write_results(tmp_path / "ok1", "lors", 100, [1.0, 2.0, 3.0], seed=1)
    write_results(tmp_path / "part", "tesla_vl", 100, [5.0], expected=3, complete=False)
    dead = tmp_path / "dead" / ".hydra"
    dead.mkdir(parents=True)
    (dead / "config.yaml").write_text("stage: distill\nevaluate: true\n")
    not_a_result_stage = tmp_path / "buf" / ".hydra"
    not_a_result_stage.mkdir(parents=True)
    (not_a_result_stage / "config.yaml").write_text("stage: buffer\n")
    col = collect([tmp_path])
    text = "\n".join(col.problems)
    assert "partial, 1 of 3 student seeds" in text
    assert "dead: a `mmdd distill` run without results.json" in text
    assert "tesla_vl / budget 100: 1 set(s), others have 2" in text
    assert "buf" not in text
    # the partial run still shows, with its real seed count
    tesla = next(c for c in col.cells if c.method == "tesla_vl")
    assert tesla.seeds == "1×1"


def test_sweep_variants_stay_apart_and_seeds_do_not_split_cells():
    assert variant_of(["method=lors", "seed=2", "budget=100", "method.lr_img=100", "paths.output_dir=x"]) == "method.lr_img=100"
    assert variant_of(["seed=1"]) == ""
    # what every collected run shares (a grid's common settings) does not split rows
    assert variant_of(["method.iterations=3", "method.lr_img=10"], common={"method.iterations=3"}) == "method.lr_img=10"


def test_best_marked_per_budget_and_formats(tmp_path):
    write_results(tmp_path / "a", "lors", 100, [4.0, 6.0])
    write_results(tmp_path / "b", "random", 100, [1.0, 1.0])
    write_results(tmp_path / "c", "random", 200, [9.0, 9.0])  # alone at its budget: nothing to beat
    rows = rows_from_cells(collect([tmp_path]).cells)
    md = render(rows, "md")
    lors_line = next(line for line in md.splitlines() if "| lors |" in line)
    assert "**5.00 ± 1.41**" in lors_line
    assert "**" not in next(line for line in md.splitlines() if "| random | 200 |" in line)
    latex = render(rows, "latex")
    assert r"\textbf{5.00 $\pm$ 1.41}" in latex and latex.startswith(r"\begin{tabular}") and r"2$\times$2" not in latex
    rows_csv = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    lors = next(r for r in rows_csv if r["method"] == "lors")
    assert float(lors["r_mean_mean"]) == pytest.approx(5.0) and float(lors["r_mean_std"]) == pytest.approx(1.4142, abs=1e-3)
    assert "r_mean" in lors["best"].split(";")


def test_anchors_beside_our_rows(tmp_path):
    write_results(tmp_path / "a", "lors", 100, [4.0, 6.0])
    anchors = [{"paper": "lors", "dataset": "flickr30k", "budget": 100, "method": "lors",
                "ir1": 1.0, "ir5": 2.0, "ir10": 3.0, "tr1": 4.0, "tr5": 5.0, "tr10": 6.0}]
    rows = rows_from_cells(collect([tmp_path]).cells)
    assert "reported" not in render(rows, "md", anchors)  # synscenes has no paper numbers of its own
    md = render(rows, "md", anchors, "flickr30k")
    anchor = next(line for line in md.splitlines() if "reported" in line)
    assert "| 1.00 | 2.00 | 3.00 | 4.00 | 5.00 | 6.00 | 3.50 |" in anchor  # r_mean from the six recalls


def test_table_command_writes_file_and_reports(tmp_path, capsys):
    write_results(tmp_path / "runs" / "a", "lors", 100, [4.0, 6.0])
    write_results(tmp_path / "runs" / "b", "lors", 200, [1.0], expected=2, complete=False)
    out = tmp_path / "table.tex"
    assert table_command([str(tmp_path / "runs"), "-f", "latex", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert out.read_text().startswith(r"\begin{tabular}")
    assert "partial, 1 of 2" in captured.err
    assert table_command([str(tmp_path / "empty")]) == 2
    assert "no results.json" in capsys.readouterr().err


def cost(seconds, teacher_seconds=120.0, experts=5):
    return {"distill_seconds": seconds, "device": "cpu (2 threads)", "iterations": 10,
            "teachers": {"experts": experts, "seconds": teacher_seconds, "device": "cpu (2 threads)"},
            "storage": {"pairs": 99, "floats": 99 * 3456 + 99 * 99 + 2}}


def test_cost_column_and_time_plot(tmp_path):
    write_results(tmp_path / "m0", "mdm", 100, [4.0, 6.0], seed=0, cost=cost(30.0))
    write_results(tmp_path / "m1", "mdm", 100, [5.0, 5.0], seed=1, cost=cost(90.0))
    write_results(tmp_path / "l0", "lors", 100, [5.0, 5.0], seed=0, cost=cost(7200.0, teacher_seconds=None))
    write_results(tmp_path / "r0", "random", 100, [1.0, 1.0], seed=0, cost=cost(0.5, experts=0, teacher_seconds=0.0))
    write_results(tmp_path / "old", "herding", 100, [2.0, 2.0], seed=0)  # results written before costs were recorded
    rows = rows_from_cells(collect([tmp_path]).cells)
    mdm = next(r for r in rows if r["method"] == "mdm")
    assert mdm["cost"]["distill_seconds"] == pytest.approx(60.0) and mdm["cost"]["sets"] == 2
    md = render(rows, "md")
    line = {r: next(x for x in md.splitlines() if f"| {r} |" in x) for r in ("mdm", "lors", "random", "herding")}
    assert line["mdm"].endswith("| 1.0 min + 2.0 min teachers (5) | 352k |")  # 99 pairs of 3x32x32 + 384, S, 2 lrs
    assert line["lors"].endswith("| 2.0 h + ? teachers (5) | 352k |")  # the store's training time was not recorded
    assert line["random"].endswith("| 0.5 s | 352k |") and line["herding"].endswith("| – | – |")
    assert "measured on cpu (2 threads)" in md
    rows_csv = {r["method"]: r for r in csv.DictReader(io.StringIO(render(rows, "csv")))}
    assert rows_csv["mdm"]["distill_seconds"] == "60.0" and rows_csv["lors"]["teacher_seconds"] == ""
    assert rows_csv["mdm"]["storage_floats"] == str(99 * 3456 + 99 * 99 + 2)
    png = tmp_path / "time.png"
    assert table_command([str(tmp_path), "--plot", str(png), "--plot-x", "time"]) == 0 and png.stat().st_size > 0


def write_student_results(path, set_dir, model, students, distill_job, method="lors", seed=0, threshold=0.99,
                          overrides=()):
    """A results.json of one set's students: its distill job (hashes agree) or an `mmdd evaluate` of another model."""
    path.mkdir(parents=True, exist_ok=True)
    res = {"label": method, "method": method, "budget": 100, "dataset": "synscenes", "seed": seed,
           "protocol": {"name": "mmdd"}, "complete": True, "expected_seeds": len(students), "num_seeds": len(students),
           "seeds": [{"seed": i, "test": metrics(v)} for i, v in enumerate(students)],
           "synthetic": str(set_dir), "synthetic_config_hash": f"set{seed}{method}",
           "config_hash": f"set{seed}{method}" if distill_job else f"eval{model}",
           "chance": {"r_mean": 0.53, "threshold": threshold}, "overrides": list(overrides),
           "config": {"model": {"name": model}}}
    (path / "results.json").write_text(json.dumps(res))


def test_by_student_pivot_pools_sets_per_model_and_names_rows_by_their_distill_job(tmp_path, capsys):
    from mmdd.report.students import pivot_by_student, render_by_student

    for seed, (own, other) in enumerate([([4.0, 2.0], [1.0]), ([6.0, 4.0], [2.0])]):
        set_dir = tmp_path / "lors" / str(seed) / "synthetic"
        write_student_results(tmp_path / "lors" / str(seed), set_dir, "convnet", own, True, seed=seed,
                              overrides=["method=lors", "method.phases=null"])
        write_student_results(tmp_path / "cross" / f"lors{seed}", set_dir, "resnet18", other, False, seed=seed,
                              overrides=["model=resnet18", "protocol.num_seeds=1"])
    # a set evaluated only by another model (no distill job collected): named by its label, no ratio
    write_student_results(tmp_path / "cross" / "random", tmp_path / "random" / "synthetic", "vit", [0.5, 0.4], False,
                          method="random")
    rows, models = pivot_by_student(collect([tmp_path]).cells)
    assert models == ["convnet", "resnet18", "vit"]  # the distilling model first
    # students trained otherwise (here a fixed step size) are a column of their own, not pooled with the others
    write_student_results(tmp_path / "cross" / "lors0_lr", tmp_path / "lors" / "0" / "synthetic", "resnet18", [3.0],
                          False, overrides=["model=resnet18", "protocol.num_seeds=1", "protocol.lr=0.01"])
    other_rows, other_models = pivot_by_student(collect([tmp_path]).cells)
    assert other_models == ["convnet", "resnet18", "resnet18 (protocol.lr=0.01)", "vit"]
    assert other_rows[0]["values"]["resnet18"] == rows[0]["values"]["resnet18"]
    assert other_rows[0]["values"]["resnet18 (protocol.lr=0.01)"]["r_mean"] == pytest.approx(3.0)
    (tmp_path / "cross" / "lors0_lr" / "results.json").unlink()
    lors, random_row = rows
    assert lors["set"] == "lors (method.phases=null)" and lors["home"] == "convnet"
    assert lors["values"]["convnet"]["r_mean"] == pytest.approx(4.0)  # (4 + 2 + 6 + 4) / 4
    assert lors["values"]["resnet18"]["r_mean"] == pytest.approx(1.5)
    assert (lors["values"]["resnet18"]["sets"], lors["values"]["resnet18"]["students"]) == (2, [1])
    assert random_row["set"] == "random" and random_row["home"] is None
    assert random_row["values"]["vit"]["at_chance"] and not lors["values"]["resnet18"]["at_chance"]
    text = render_by_student(rows, models)
    assert "| synscenes | 100 | lors (method.phases=null) | 4.00 (2×2) | 1.50 (2×1) | – | 0.38 | – |" in text
    assert "| synscenes | 100 | random | – | – | 0.45 † (1×2) | – | – |" in text
    assert table_command([str(tmp_path), "--by-student", "-f", "csv"]) == 0
    lines = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    resnet = next(r for r in lines if r["student_model"] == "resnet18")
    assert resnet["ratio_to_distilling_model"] == "0.3750" and resnet["distilled_with"] == "convnet"
    with pytest.raises(SystemExit):
        table_command([str(tmp_path), "--by-student", "--plot", str(tmp_path / "p.png")])


def test_versus_pairs_sets_by_distillation_seed(tmp_path, capsys):
    """`--versus A B`: per distillation seed, each set's mean over its students, A - B at the seeds both hold, its mean
    and std over seeds; budgets compared separately; the verdict only counts signs. Hand-computed."""
    # lors: seeds 0, 1, 2 -> set means 2, 4, 3 ; tesla_vl: seeds 0, 1 (2 missing) -> 1, 5
    write_results(tmp_path / "l0", "lors", 100, [1.0, 3.0], seed=0)
    write_results(tmp_path / "l1", "lors", 100, [4.0, 4.0], seed=1)
    write_results(tmp_path / "l2", "lors", 100, [3.0, 3.0], seed=2)
    write_results(tmp_path / "t0", "tesla_vl", 100, [1.0, 1.0], seed=0)
    write_results(tmp_path / "t1", "tesla_vl", 100, [6.0, 4.0], seed=1)
    # budget 200: lors above at both seeds
    write_results(tmp_path / "l200_0", "lors", 200, [5.0, 5.0], seed=0)
    write_results(tmp_path / "l200_1", "lors", 200, [6.0, 6.0], seed=1)
    write_results(tmp_path / "t200_0", "tesla_vl", 200, [4.0, 4.0], seed=0)
    write_results(tmp_path / "t200_1", "tesla_vl", 200, [4.5, 5.5], seed=1)
    from mmdd.report.orderings import versus

    rows = rows_from_cells(collect([tmp_path]).cells)
    at100, at200 = versus(rows, "lors", "tesla_vl")
    assert (at100.budget, at100.seeds, at100.differences) == (100, [0, 1], [1.0, -1.0])
    assert at100.mean == 0.0 and at100.std == pytest.approx(statistics.stdev([1.0, -1.0]))
    assert at100.verdict == "seeds disagree (A above at 1, below at 1 of 2)"
    assert at200.differences == [1.0, 1.0] and at200.verdict == "A above B at every seed (2 of 2)"
    assert table_command([str(tmp_path), "--versus", "lors", "tesla_vl"]) == 0
    out = capsys.readouterr().out
    assert ("| lors | tesla_vl | synscenes | 200 | mmdd | 0,1 | +1.00, +1.00 | +1.00 ± 0.00 | A above B at every seed "
            "(2 of 2) |") in out
    assert table_command([str(tmp_path), "--versus", "lors", "dm"]) == 2
    assert "no row named 'dm'" in capsys.readouterr().err
    # a tie is neither above nor below
    write_results(tmp_path / "t200_2", "tesla_vl", 200, [7.0, 7.0], seed=2)
    write_results(tmp_path / "l200_2", "lors", 200, [7.0, 7.0], seed=2)
    assert versus(rows_from_cells(collect([tmp_path]).cells), "lors", "tesla_vl")[1].verdict == (
        "seeds disagree (A above at 2, below at 0, equal at 1 of 3)")
    # two sets of one seed in a row cannot be paired: refused with both places
    write_results(tmp_path / "copy" / "l200_0", "lors", 200, [9.0, 9.0], seed=0)
    assert table_command([str(tmp_path), "--versus", "lors", "tesla_vl"]) == 2
    assert "holds two sets of distillation seed 0" in capsys.readouterr().err


def test_a_tuned_row_is_named_by_what_runs_on_top_of_its_searchs_settings(tmp_path):
    """Tuned rows drop the chosen overrides from their names (whole tokens: lr_img=1 is not lr_img=12); a tuned row
    whose name an untuned row of the same budget already has says "tuned"; a run marked `tuned_from=` is tuned even
    where it overrides a chosen key (a multirun keeps the last value only)."""
    from mmdd.report.tuning import Search

    search = Search("dm", "dm", trials=12, failed=0, val_r_mean=3.0, settings={"method.lr_img": 12.0})
    write_results(tmp_path / "a", "dm", 100, [1.0], overrides=["method.lr_img=12", "method.space=features"])
    write_results(tmp_path / "b", "dm", 100, [1.0], overrides=["method.lr_img=1"])
    write_results(tmp_path / "c", "dm", 100, [1.0], overrides=["tuned_from=dm", "method.lr_img=3"])
    write_results(tmp_path / "d", "dm", 200, [1.0], overrides=["method.lr_img=12"])
    write_results(tmp_path / "e", "dm", 200, [1.0])
    rows = rows_from_cells(collect([tmp_path]).cells, searches=[search])
    names = {(r["method"], r["budget"]): r["tuning"] is not None for r in rows}
    assert names == {("dm (method.space=features)", 100): True, ("dm (method.lr_img=1)", 100): False,
                     ("dm (method.lr_img=3)", 100): True, ("dm (tuned)", 200): True, ("dm", 200): False}
