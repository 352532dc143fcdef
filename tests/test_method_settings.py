"""Method settings: one source (conf/method/*.yaml; the dataclasses hold types, no defaults), every setting a method
reads reachable by a plain override, and a sentence for a key that is wrong, unknown or missing."""

import dataclasses
from typing import Literal

import pytest
from hydra.utils import get_class

from conftest import run_in_process
from helpers import method_config, method_values
from mmdd.config_schema import _NO_VALUE, build_settings, checked_value, describe_hint
from mmdd.errors import MmddError
from mmdd.paths import conf_dir

METHODS = sorted(p.stem for p in (conf_dir() / "method").glob("*.yaml") if not p.stem.startswith("_"))


def settings_class(method: str):
    return get_class(method_config(method)["_target_"]).settings_cls


@pytest.mark.parametrize("method", METHODS)
def test_every_method_config_sets_exactly_its_settings_and_they_have_no_other_defaults(method):
    cls = settings_class(method)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(method_values(method)) == set(fields), method  # every setting the class reads, nothing else
    defaulted = [n for n, f in fields.items() if f.default is not dataclasses.MISSING
                 or f.default_factory is not dataclasses.MISSING]
    assert defaulted == [], f"{cls.__name__} has defaults of its own: {defaulted}"
    build_settings(cls, method_values(method), "method", method)  # and they are valid


def test_a_setting_missing_from_a_method_s_yaml_before_is_reachable_by_a_plain_override(tmp_path):
    """`method=lors method.grad_clip=1.0` was refused (grad_clip lived only in the dataclass)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("distill", overrides=["method=lors", "method.grad_clip=1.0", "method.min_start_epoch=1",
                                            "paths.output_dir=/tmp/x"])
    assert cfg.method.grad_clip == 1.0 and cfg.method.min_start_epoch == 1


def test_an_unknown_method_key_names_the_close_matches(tmp_path):
    proc = run_in_process(["distill", "method=lors", "+method.grad_klip=1.0", "evaluate=false",
                           "hydra.run.dir=outputs/x"], tmp_path)
    assert proc.returncode == 2
    assert "method.grad_klip (did you mean method.grad_clip?): not a setting here" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_method_config_without_a_setting_names_the_config_and_the_setting():
    from mmdd.methods.trajectory.objective import TrajectoryMatching

    values = {k: v for k, v in method_values("mtt_vl").items() if k not in ("syn_steps", "ema_decay")}
    with pytest.raises(MmddError, match=r"conf/method/mine.yaml \(method=mine\) does not set method.ema_decay, "
                                        r"method.syn_steps: a config names every setting its method reads"):
        TrajectoryMatching("mine", **values)


@pytest.mark.parametrize("value, hint, want", [
    (3.0, int, 3), ("3", int, _NO_VALUE), (True, int, _NO_VALUE), (2, float, 2.0), (float("inf"), float, _NO_VALUE),
    (None, int | None, None), (None, int, _NO_VALUE),
    ("tesla", Literal["full", "tesla"], "tesla"), ("fast", Literal["full", "tesla"], _NO_VALUE),
    (True, Literal[1], _NO_VALUE),
    ([1, 2.0], list[int], [1, 2]), ([1, "a"], list[int], _NO_VALUE), ("12", list[int], _NO_VALUE),
    ({"a": 1}, dict[str, float], {"a": 1.0}), ({"a": "x"}, dict[str, float], _NO_VALUE),
    ([{"pairs": 3}], list[dict] | None, [{"pairs": 3}]),
])
def test_a_value_is_checked_against_its_annotation(value, hint, want):
    assert checked_value(value, hint) == want if want is not _NO_VALUE else checked_value(value, hint) is _NO_VALUE


def test_what_a_setting_must_be_is_said_in_words():
    assert describe_hint(list[int]) == "a list of integers"
    assert describe_hint(int | None) == "an integer or null"
    assert describe_hint(Literal["full", "tesla"]) == "one of ('full', 'tesla')"


# every method config for 2 iterations on the tiny store, as timm tests every registered model (the golden harness,
# experiments/golden.py, runs the same rows and compares their outputs byte for byte)
RUN_ARGS = {
    "mtt_vl": ["method.syn_steps=2"], "tesla_vl": ["method.syn_steps=2"], "lors": ["method.syn_steps=2"],
    "repblend": ["method.syn_steps=2", "model=convnet_heads"], "ptm_st": ["method.syn_steps=2", "method.convexify.end=4"],
    "dm": ["method.real_batch=16"], "mdm": ["method.real_batch=16", "method.syn_batch=4"], "pds": ["method.restarts=1"],
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_config_distils_on_tiny_data(root, method):
    import json

    from conftest import TINY
    from helpers import TINY_DISTILL

    if method == "repblend":  # a frozen, pre-trained backbone and its own store
        run_in_process(["pretrain", *TINY, "logger=none", "pretrain.batch_size=16", "hydra.run.dir=outputs/pretrain_heads"],
                       root, check=True)
        run_in_process(["buffer", *TINY, "logger=none", "model=convnet_heads", "hydra.run.dir=outputs/buffer_heads"],
                       root, check=True)
    learned = get_class(method_config(method)["_target_"]).learned
    args = [*(o for o in TINY_DISTILL if not o.startswith("method.")), *RUN_ARGS.get(method, [])]
    run = f"every_method_{method}"
    run_in_process(["distill", f"method={method}", *args, *(["method.iterations=2"] if learned else []),
                    f"hydra.run.dir=outputs/{run}"], root, check=True)
    manifest = json.loads((root / "outputs" / run / "synthetic" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["method"] == method and manifest["budget"] == 8
    assert manifest["iteration"] == (2 if learned else 0)
    if not learned:  # a selection: real pairs, each image with one of its own captions
        captions = json.loads((root / "outputs" / run / "synthetic" / "captions.json").read_text())
        assert len(set(captions)) > 1
