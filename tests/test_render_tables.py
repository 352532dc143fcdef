"""experiments/render_tables.py: a report's tables are what the `mmdd table` commands printed under them print, over
committed records; a stale table is found, and a block that is not `mmdd table` is refused with the line."""

from pathlib import Path

import pytest

from conftest import ROOT, experiment_script, run_command

RECORDS = "experiments/methods_comparison_runs/tuned/dm"  # committed records of a real run (6 jobs)


def script():
    return experiment_script("render_tables")


def report(tmp_path: Path, table: str, commands: str) -> Path:
    path = tmp_path / "report.md"
    path.write_text(f"# A report\n\nText before.\n\n{script().BEGIN}\n{table}\n{script().END}\n\n```bash\n{commands}\n"
                    "```\n\nText after.\n")
    return path


def test_a_table_is_what_its_commands_print_and_a_stale_one_is_found(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands' paths are the repository's
    render = script()
    path = report(tmp_path, "| an old table |", f"R={RECORDS}\n# the DM rows, across seeds\nmmdd table $R --spread sets \\\n"
                  "    --versus dm dm\nmmdd table ${R}/0")
    assert render.main([str(path), "--check"]) == 1  # the old table is not what the commands print
    assert render.main([str(path)]) == 0
    expected = [run_command(["table", RECORDS, "--spread", "sets", "--versus", "dm", "dm"], ROOT).stdout.rstrip("\n"),
                run_command(["table", f"{RECORDS}/0"], ROOT).stdout.rstrip("\n")]
    text = path.read_text()
    assert f"{render.BEGIN}\n{expected[0]}\n\n{expected[1]}\n{render.END}\n\n```bash\nR=" in text
    assert text.startswith("# A report\n\nText before.\n\n") and text.endswith("```\n\nText after.\n")
    assert "| synscenes | dm | 100 |" in expected[0] and "A - B per seed" in expected[0]
    assert render.main([str(path), "--check"]) == 0  # current now
    path.write_text(text.replace("| synscenes | dm | 100 |", "| synscenes | dm | 101 |", 1))
    assert render.main([str(path), "--check"]) == 1


@pytest.mark.parametrize("commands, message", [
    ("mmdd table $R", "$R is not set in this block"),
    (f"mmdd table {RECORDS} && rm -rf outputs", "is shell syntax"),
    (f"mmdd table {RECORDS} --spread nowhere", "failed (2)"),
    ("python make_table.py", "only `mmdd table` commands"),
    ("# nothing", "has no `mmdd table` command"),
    ("mmdd table does/not/exist", "no results.json"),
])
def test_a_block_that_cannot_make_the_table_is_an_error_naming_the_line(tmp_path, monkeypatch, capsys, commands,
                                                                         message):
    monkeypatch.chdir(ROOT)
    path = report(tmp_path, "| kept |", commands)
    before = path.read_text()
    assert script().main([str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and f"{path}:" in err
    assert path.read_text() == before  # nothing written


def test_a_variable_may_hold_a_row_name_with_spaces():
    """Row names such as `ptm_st (method.phases=...)` are long: a block names them once."""
    commands = script().commands_of(['P="ptm_st (method.phases=null)"  # one phase',
                                     'mmdd table runs --versus "$P" lors \\', '    --versus lors "${P}"'], "here")
    assert commands == [["runs", "--versus", "ptm_st (method.phases=null)", "lors", "--versus", "lors",
                         "ptm_st (method.phases=null)"]]
