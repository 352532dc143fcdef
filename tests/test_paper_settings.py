"""Every paper config holds what the reference scripts set: the table in experiments/paper_settings.md
("## Reference scripts, transcribed"; one row per config and key, each with the script and line it comes from)
against the config as Hydra composes it."""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmdd.paths import conf_dir

SETTINGS = Path(__file__).resolve().parents[1] / "experiments" / "paper_settings.md"
SECTION = "## Reference scripts, transcribed"
COLUMNS = ["config", "key", "value", "source"]
CELLS = [f"{method}_{data}_{budget}" for method in ("lors", "repblend") for data in ("flickr", "coco")
         for budget in (100, 200, 500)]
CONFIGS = ["mtt_vl_flickr_100", *CELLS]
_ABSENT = object()


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def read_table(path: Path = SETTINGS) -> list[dict]:
    """The rows of the first Markdown table under SECTION; a missing section, table or malformed row fails."""
    lines = path.read_text().splitlines()
    if SECTION not in (line.strip() for line in lines):
        raise AssertionError(f"{path}: no section {SECTION!r}")
    start = [line.strip() for line in lines].index(SECTION) + 1
    body = []
    for lineno, line in enumerate(lines[start:], start + 1):
        if line.startswith("## "):
            break
        if line.lstrip().startswith("|"):
            body.append((lineno, line))
        elif body:
            break  # the table ended
    if len(body) < 3:
        raise AssertionError(f"{path}: no table with rows under {SECTION!r}")
    (_, header), (sep_no, sep), *data = body
    if _cells(header) != COLUMNS:
        raise AssertionError(f"{path}: the table's header is {_cells(header)}, expected {COLUMNS}")
    if not all(set(c) <= set("-: ") and "-" in c for c in _cells(sep)):
        raise AssertionError(f"{path}:{sep_no}: not a header separator: {sep!r}")
    rows = []
    for lineno, line in data:
        cells = _cells(line)
        if len(cells) != len(COLUMNS) or not all(cells):
            raise AssertionError(f"{path}:{lineno}: malformed row (want {len(COLUMNS)} non-empty cells): {line!r}")
        row = dict(zip(COLUMNS, cells))
        try:
            row["value"] = yaml.safe_load(row["value"])
        except yaml.YAMLError as err:
            raise AssertionError(f"{path}:{lineno}: value {row['value']!r} is not YAML: {err}") from err
        row["line"] = lineno
        rows.append(row)
    return rows


def _same(config_value, reference) -> bool:
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if number(config_value) and number(reference):
        return float(config_value) == float(reference)
    return config_value == reference


def compose_paper(name: str):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("distill", overrides=[f"experiment=paper/{name}", "paths.output_dir=/tmp/x"])


def test_the_table_covers_every_paper_config_and_only_those():
    rows = read_table()
    in_table = {r["config"] for r in rows}
    on_disk = {p.stem for p in (conf_dir() / "experiment" / "paper").glob("*.yaml") if not p.stem.startswith("_")}
    assert set(CONFIGS) <= on_disk, f"missing from conf/experiment/paper: {sorted(set(CONFIGS) - on_disk)}"
    assert not set(CONFIGS) - in_table, f"configs without rows in {SETTINGS.name}: {sorted(set(CONFIGS) - in_table)}"
    assert not in_table - on_disk, f"rows for configs that do not exist: {sorted(in_table - on_disk)}"
    keys = [(r["config"], r["key"]) for r in rows]
    assert len(keys) == len(set(keys)), f"duplicate rows: {sorted({k for k in keys if keys.count(k) > 1})}"


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_config_holds_the_reference_scripts_settings(name):
    rows = [r for r in read_table() if r["config"] == name]
    assert rows, f"{name}: no rows in {SETTINGS.name}"
    cfg = compose_paper(name)
    wrong = []
    for r in rows:
        value = OmegaConf.select(cfg, r["key"], default=_ABSENT)
        if value is _ABSENT:  # a misspelt key must not pass as null
            wrong.append(f"{r['key']}: not in the composed config (reference {r['value']!r}, {r['source']})")
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if not _same(value, r["value"]):
            wrong.append(f"{r['key']}: config {value!r} != reference {r['value']!r} ({r['source']}; "
                         f"{SETTINGS.name}:{r['line']})")
    assert not wrong, f"{name} differs from the reference scripts:\n  " + "\n  ".join(wrong)
