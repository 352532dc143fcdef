"""Real datasets at their real size: damaged images found when a split is opened, duplicates counted, batches that
fit, stores that only count complete experts, checks before anything slow. Fixtures are real files in each format,
written by the tests."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from mmdd.data.annotations import load_blip_split, load_karpathy, load_pairs_table
from mmdd.errors import ArtifactError, DataError, MmddError
from mmdd.paths import conf_dir


def write_jpegs(folder: Path, n: int, size=(40, 30)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        names.append(f"imgs/{i}.jpg")
    return names


def write_table(path: Path, rows) -> None:
    path.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows))


def user_data(root: Path, n_train=6, n_eval=3) -> Path:
    names = write_jpegs(root / "imgs", n_train + 2 * n_eval)
    write_table(root / "train.jsonl", [(names[i], f"a picture number {i}") for i in range(n_train)])
    write_table(root / "val.jsonl", [(names[n_train + i], f"val picture {i}") for i in range(n_eval)])
    write_table(root / "test.jsonl", [(names[n_train + n_eval + i], f"test picture {i}") for i in range(n_eval)])
    return root


def compose_cfg(stage: str, tmp_path: Path, root: Path, *extra: str):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose(stage, overrides=[f"paths.root_dir={tmp_path}", "data=pairs_table", f"data.root={root}",
                                         "data.image_size=16", "logger=none", f"paths.output_dir={tmp_path}/out",
                                         *extra])


# ------------------------------------------------------------------ damaged images, found when a split is opened
@pytest.mark.parametrize("storage", [["data.decode_cache=false", "data.preload=false"],
                                     ["data.decode_cache=false", "data.preload=true"],
                                     ["data.decode_cache=true", "data.preload=false"]])
def test_every_damaged_image_is_reported_when_the_split_is_opened(tmp_path, storage, monkeypatch):
    from mmdd.data import splits as data_splits
    from mmdd.data.splits import load_data

    # before any caption is embedded (an hour for Flickr30K with BERT on a CPU)
    monkeypatch.setattr(data_splits, "embed_captions", lambda *a, **k: pytest.fail("captions embedded first"))

    root = user_data(tmp_path / "mine")
    (root / "imgs" / "1.jpg").write_bytes(b"")  # 0 bytes
    data = (root / "imgs" / "4.jpg").read_bytes()
    (root / "imgs" / "4.jpg").write_bytes(data[: len(data) // 3])  # truncated
    cfg = compose_cfg("buffer", tmp_path, root, *storage)
    with pytest.raises(DataError) as err:
        load_data(cfg, splits=("train",))
    msg = str(err.value)
    assert msg.startswith("2 of the 6 images of my_pairs/train cannot be used:"), msg
    assert "train.jsonl: line 2: image file" in msg and "train.jsonl: line 5: image file" in msg, msg


def test_a_checked_split_is_not_decoded_again_until_a_file_changes(tmp_path, monkeypatch):
    from mmdd.data import image_cache
    from mmdd.data.splits import load_data

    root = user_data(tmp_path / "mine")
    cfg = compose_cfg("buffer", tmp_path, root, "data.decode_cache=false", "data.preload=false")
    load_data(cfg, splits=("train",))
    calls = []
    monkeypatch.setattr(image_cache, "load_image", lambda p: calls.append(p))
    load_data(cfg, splits=("train",))
    assert calls == []  # remembered by path, size and mtime
    (root / "imgs" / "2.jpg").write_bytes((root / "imgs" / "3.jpg").read_bytes())  # replaced: checked again
    load_data(cfg, splits=("train",))
    assert len(calls) == 6


# ------------------------------------------------------------------ duplicates
def test_an_image_listed_twice_in_a_blip_test_split_names_both_entries(tmp_path):
    names = write_jpegs(tmp_path / "imgs", 3)
    entries = [{"image": names[0], "caption": ["a", "b"]}, {"image": names[1], "caption": ["c"]},
               {"image": names[0], "caption": ["d", "e"]}]
    (tmp_path / "test.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"test.json: entry 2 lists image 'imgs/0.jpg' again \(entry 0 lists it "
                                        r"first\); in this format each image of the test split has one entry"):
        load_blip_split(tmp_path / "test.json", tmp_path, "test")
    # BLIP's train files have one entry per caption: the same image on several entries is the format
    train = [{"image": names[0], "caption": "a"}, {"image": names[0], "caption": "b"}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    assert load_blip_split(tmp_path / "train.json", tmp_path, "train").num_captions == 2


def test_an_image_listed_twice_in_a_karpathy_file_names_both_entries(tmp_path):
    write_jpegs(tmp_path / "imgs", 2)
    images = [{"filename": f"{i}.jpg", "filepath": "imgs", "split": "val", "sentences": [{"raw": "x"}]}
              for i in (0, 1, 0)]
    (tmp_path / "k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(DataError, match=r"images\[2\] lists image 'imgs/0.jpg' again \(images\[0\] lists it first\)"):
        load_karpathy(tmp_path / "k.json", tmp_path)


def test_duplicate_rows_and_images_shared_by_splits_are_warned_about_with_counts(tmp_path, caplog):
    from mmdd.data.splits import load_annotations

    root = user_data(tmp_path / "mine")
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    rows += [rows[0], rows[2], rows[0]]  # three exact repeats
    write_table(root / "train.jsonl", [(r["image"], r["caption"]) for r in rows])
    write_table(root / "test.jsonl", [("imgs/0.jpg", "leaked"), ("imgs/9.jpg", "test picture"),
                                      ("imgs/1.jpg", "leaked too")])
    cfg = compose_cfg("buffer", tmp_path, root)
    with caplog.at_level(logging.WARNING):
        splits = load_annotations(cfg.data)
    assert splits["train"].num_captions == 9
    text = caplog.text
    assert "train.jsonl: 3 (image, caption) rows repeat an earlier row exactly (line 7, line 8, line 9)" in text
    assert ("2 images of the test split are also in the train split (0.jpg (" in text
            and "train.jsonl: line 1 and " in text and "test.jsonl: line 1)" in text), text


def test_rows_of_a_pairs_table_may_share_an_image(tmp_path, caplog):
    names = write_jpegs(tmp_path / "imgs", 1)
    write_table(tmp_path / "t.jsonl", [(names[0], "one"), (names[0], "two")])
    with caplog.at_level(logging.WARNING):
        split = load_pairs_table(tmp_path / "t.jsonl", tmp_path, "train")
    assert split.num_images == 1 and split.num_captions == 2 and caplog.text == ""


# ------------------------------------------------------------------ checks before training, before anything slow
def test_train_split_smaller_than_the_batch_is_refused_before_training(tmp_path):
    from mmdd.stages.buffer import run_buffer

    root = user_data(tmp_path / "mine", n_train=6)
    store = tmp_path / "store"
    cfg = compose_cfg("buffer", tmp_path, root, "teacher.batch_size=16", f"buffer_dir={store}")
    with pytest.raises(DataError, match=r"teacher.batch_size=16 is larger than the train split \(6 caption examples; "
                                        r"only full batches are used\): set teacher.batch_size to at most 6"):
        run_buffer(cfg)
    assert not store.exists()


def test_budget_is_checked_before_captions_are_embedded(tmp_path, monkeypatch):
    from mmdd.data import splits as data_splits
    from mmdd.stages.distill import run_distill

    root = user_data(tmp_path / "mine", n_train=6)
    monkeypatch.setattr(data_splits, "embed_captions", lambda *a, **k: pytest.fail("captions embedded"))
    out = tmp_path / "synthetic"
    cfg = compose_cfg("distill", tmp_path, root, "budget=50", "method=random")
    with pytest.raises(MmddError, match=r"budget=50 is larger than the train split \(6 images\)"):
        run_distill(cfg, out_dir=out)
    assert not out.exists()


def test_num_workers_auto_follows_the_cores_this_process_may_use():
    import os

    from mmdd.data.splits import loader_workers

    assert loader_workers("auto") == min(8, len(os.sched_getaffinity(0)))
    assert loader_workers(3) == 3 and loader_workers("0") == 0
    with pytest.raises(DataError, match="data.num_workers must be a count >= 0 or auto, got 'many'"):
        loader_workers("many")


# ------------------------------------------------------------------ a store counts complete experts only
def store_args(root: Path, identity: dict):
    return dict(dataset="d", model="m", config_hash=json.dumps(identity), param_names={"image": ["w"], "text": []},
                param_shapes={"w": [2]}, epochs=1, teacher={}, identity=identity)


def test_a_store_gets_its_manifest_with_its_first_expert(tmp_path):
    from mmdd.teachers.trajectory_store import TrajectoryStore

    root = tmp_path / "store"
    TrajectoryStore.create_or_open(root, **store_args(root, {"lr": 0.1}))
    assert not (root / "manifest.json").exists()
    # a first run that failed before any expert does not block a run with other settings
    store = TrajectoryStore.create_or_open(root, **store_args(root, {"lr": 0.2}))
    store.save_expert(0, {"w": torch.zeros(2, 2)})
    assert json.loads((root / "manifest.json").read_text())["identity"] == {"lr": 0.2}
    with pytest.raises(ArtifactError, match=r"made by another configuration \(differs in lr: 0.2 -> 0.1"):
        TrajectoryStore.create_or_open(root, **store_args(root, {"lr": 0.1}))


def test_distilling_from_a_store_without_a_complete_expert_says_what_to_run(tmp_path):
    from mmdd.teachers.trajectory_store import ExpectedStore
    from mmdd.models.dual_encoder import build_dual_encoder, frozen_backbone_fingerprint
    from mmdd.teachers.trajectory_store import TrajectoryStore
    from mmdd.identity import data_identity, teacher_hash, teachers_identity
    from mmdd.utils.io import atomic_write_json, stable_hash

    root = user_data(tmp_path / "mine")
    store_dir = tmp_path / "store"
    cfg = compose_cfg("distill", tmp_path, root, f"buffer_dir={store_dir}")
    model = build_dual_encoder(cfg.model, 384, 16)
    names = model.modality_parameter_names()
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    store = TrajectoryStore.create_or_open(
        store_dir, dataset=str(cfg.data.name), model=str(cfg.model.name), config_hash=teacher_hash(cfg),
        param_names=names, param_shapes={n: shapes[n] for g in names.values() for n in g}, epochs=1, teacher={},
        data_hash=stable_hash(data_identity(cfg.data)), identity=teachers_identity(cfg),
        backbone_fingerprint=frozen_backbone_fingerprint(model))
    atomic_write_json(store_dir / "manifest.json", store.manifest)  # a store whose only expert was set aside
    with pytest.raises(ArtifactError, match=r"has no complete expert yet .* run `mmdd buffer` with the same data"):
        ExpectedStore.of(cfg).open(model)


def test_an_expert_whose_evaluation_fails_is_not_complete(tmp_path, monkeypatch):
    from mmdd.stages import buffer
    from mmdd.teachers.trajectory_store import TrajectoryStore

    root = user_data(tmp_path / "mine", n_train=4)
    store = tmp_path / "store"
    cfg = compose_cfg("buffer", tmp_path, root, "teacher.batch_size=2", "teacher.epochs=1", "teacher.num_experts=1",
                      "model.image.width=4", "data.num_workers=0", f"buffer_dir={store}")

    def crash(*args, **kwargs):
        raise RuntimeError("killed while evaluating")

    monkeypatch.setattr(buffer, "evaluate_retrieval", crash)
    with pytest.raises(RuntimeError, match="killed while evaluating"):
        buffer.run_buffer(cfg)
    assert TrajectoryStore(store, {}).completed_experts() == []  # trained again on rerun, metrics and all


def test_caption_embedding_reports_its_rate(tmp_path, caplog):
    from mmdd.data.text_cache import build_text_encoder

    cfg = compose_cfg("buffer", tmp_path, tmp_path)
    with caplog.at_level(logging.INFO, logger="mmdd.models.text_encoder"):
        emb = build_text_encoder(cfg.model.text).encode(["a dog", "a cat", "a dog"])
    assert emb.shape[0] == 3
    assert "embedded 2 distinct captions in" in caplog.text and "captions/s)" in caplog.text


# ------------------------------------------------------------------ paths a user will have
def karpathy_flickr(root: Path, folder: str) -> None:
    """Karpathy's dataset_flickr30k.json (bare file names) beside the images in `folder`."""
    (root / folder).mkdir(parents=True)
    write_jpegs(root / folder, 6)
    images = [{"filename": f"{i}.jpg", "split": ("train", "train", "val", "val", "test", "test")[i],
               "sentences": [{"raw": f"A picture, number {i}."}]} for i in range(6)]
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))


def flickr_cfg(tmp_path: Path, root: Path, *extra: str):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("buffer", overrides=[f"paths.root_dir={tmp_path}", "data=flickr30k", f"data.root={root}",
                                            "data.format=karpathy", f"paths.output_dir={tmp_path}/out", *extra])


def test_karpathy_flickr_file_finds_its_images_in_flickr30k_images(tmp_path):
    from mmdd.data.splits import load_annotations

    root = tmp_path / "flickr30k"
    karpathy_flickr(root, "flickr30k-images")
    cfg = flickr_cfg(tmp_path, root)
    assert cfg.data.image_root == f"{root}/flickr30k-images"
    splits = load_annotations(cfg.data)
    assert [splits[s].num_images for s in ("train", "val", "test")] == [2, 2, 2]
    assert splits["train"].image_paths[0] == root / "flickr30k-images" / "0.jpg"


def test_a_missing_image_names_the_usual_folder_that_holds_it(tmp_path):
    from mmdd.data.splits import load_annotations

    root = tmp_path / "flickr30k"
    karpathy_flickr(root, "flickr30k_images")  # the underscore spelling of some mirrors
    with pytest.raises(DataError, match=rf"image {root}/flickr30k-images/0.jpg does not exist; .*; it is in "
                                        rf"{root}/flickr30k_images: set data.image_root={root}/flickr30k_images"):
        load_annotations(flickr_cfg(tmp_path, root).data)
    with pytest.raises(DataError, match=r"none of the usual image folders \(flickr30k-images, flickr30k_images"):
        load_annotations(flickr_cfg(tmp_path, root, f"data.image_root={tmp_path / 'elsewhere'}").data)


def test_a_store_still_being_filled_is_refused_unless_fewer_experts_are_asked_for(tmp_path):
    from mmdd.teachers.trajectory_store import check_enough_experts
    from mmdd.teachers.trajectory_store import TrajectoryStore

    store = TrajectoryStore(tmp_path, {})
    with pytest.raises(ArtifactError, match=r"has 2 of the 4 experts this run needs complete \(missing: 1, 3\): run "
                                            r"`mmdd buffer` .* or set method.max_experts=2"):
        check_enough_experts(store, [0, 2], wanted=4, max_experts=None)
    assert check_enough_experts(store, [0, 2], wanted=4, max_experts=2) == [0, 2]
    assert check_enough_experts(store, [0, 1, 2, 3], wanted=4, max_experts=None) == [0, 1, 2, 3]
    assert check_enough_experts(store, [0, 1, 2, 3, 4], wanted=4, max_experts=None) == [0, 1, 2, 3]
    with pytest.raises(ArtifactError, match=r"has 2 of the 3 experts"):
        check_enough_experts(store, [0, 1], wanted=4, max_experts=3)


def test_asking_for_a_gpu_without_one_is_a_sentence_and_ddp_falls_back_to_cpu_processes(tmp_path, monkeypatch):
    from mmdd.utils.trainer import build_trainer

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    root = user_data(tmp_path / "mine")
    cfg = compose_cfg("buffer", tmp_path, root, "hardware=gpu")
    with pytest.raises(MmddError, match=r"hardware.accelerator=gpu, but this machine has no usable CUDA GPU .* "
                                        r"use hardware=cpu, or hardware.accelerator=auto"):
        build_trainer(cfg)
    ddp = compose_cfg("buffer", tmp_path, root, "hardware=ddp")
    assert ddp.hardware.accelerator == "auto"
    with pytest.raises(MmddError, match=r"several processes .* re-run the `mmdd <stage>` command line"):
        build_trainer(ddp, max_epochs=1)  # mmdd starts the other processes only from its own command line
    # processes set up outside (as SLURM or torchrun do): Lightning joins them, on the CPU
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    trainer = build_trainer(ddp, max_epochs=1)
    assert type(trainer.accelerator).__name__ == "CPUAccelerator" and trainer.num_devices == 2


@pytest.mark.parametrize("setting, message", [("seed=abc", "seed='abc' must be a whole number; set seed=<int>"),
                                              ("save_every=abc", "save_every='abc' must be a whole number"),
                                              ("evaluate=maybe", "evaluate='maybe' must be true or false")])
def test_a_top_level_setting_of_the_wrong_type_fails_before_any_data_is_loaded(tmp_path, setting, message):
    from conftest import TINY, run_in_process

    proc = run_in_process(["distill", *TINY, "logger=none", setting], tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "data").exists()  # the embedded dataset was not even generated
