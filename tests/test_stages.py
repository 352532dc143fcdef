"""The one list of stages (mmdd.stages) agrees with the configs, the stage modules, the CLI and the README."""

import importlib
from pathlib import Path

import yaml

from mmdd.cli import usage
from mmdd.stage_list import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_has_its_config_and_every_stage_config_a_stage():
    declared = {}
    for path in (ROOT / "conf").glob("*.yaml"):
        stage = (yaml.safe_load(path.read_text()) or {}).get("stage")
        if stage is not None:
            assert stage == path.stem, f"{path.name} says stage: {stage}"
            declared[stage] = path
    assert set(declared) == set(STAGES)


def test_every_stage_has_a_module_that_runs_it():
    for name in STAGES:
        assert callable(importlib.import_module(f"mmdd.stages.{name}").run), name


def test_help_and_readme_name_every_stage():
    text, readme = usage(), (ROOT / "README.md").read_text()
    for stage in STAGES.values():
        assert f"  {stage.name:<9} {stage.help}" in text
        assert f"mmdd {stage.name}" in readme, f"README.md never shows `mmdd {stage.name}`"


def test_what_stops_say_they_kept_comes_from_the_stage():
    from mmdd.utils.stopping import kept

    assert kept("distill", "-") == STAGES["distill"].kept and kept("export", "nothing") == "nothing"
