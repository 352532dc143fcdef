import json

import pytest
import torch

from mmdd.errors import ArtifactError
from mmdd.teachers.trajectory_store import TrajectoryStore, flatten_trajectory

NAMES = {"image": ["backbone.w"], "text": ["text_head.w", "text_head.b"]}
SHAPES = {"backbone.w": [2, 3], "text_head.w": [4, 2], "text_head.b": [4]}


def make(root, config_hash="abc", epochs=2):
    return TrajectoryStore.create_or_open(
        root, dataset="synscenes", model="tiny", config_hash=config_hash, param_names=NAMES,
        param_shapes=SHAPES, epochs=epochs, teacher={"lr": 0.1},
    )


def traj(epochs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn([epochs + 1] + s, generator=g) for n, s in SHAPES.items()}


def test_round_trip_and_manifest_readable_without_mmdd(tmp_path):
    store = make(tmp_path / "s")
    t0, t1 = traj(seed=0), traj(seed=1)
    store.save_expert(0, t0)
    store.save_expert(1, t1)
    reopened = TrajectoryStore.open(tmp_path / "s")
    assert reopened.completed_experts() == [0, 1]
    back = reopened.load_expert(1)
    for n in SHAPES:
        assert torch.equal(back[n], t1[n])
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["epochs"] == 2 and manifest["param_names"] == NAMES
    # plain safetensors, loadable by anyone
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "s" / "expert_000.safetensors"))) == set(SHAPES)
    flat = flatten_trajectory(back, NAMES["text"])
    assert flat.shape == (3, 8 + 4)
    assert torch.equal(flat[1, :8], t1["text_head.w"][1].reshape(-1))


def test_reopen_with_other_config_is_refused(tmp_path):
    make(tmp_path / "s", config_hash="abc")
    with pytest.raises(ArtifactError, match="another configuration"):
        make(tmp_path / "s", config_hash="xyz", epochs=5)


def test_store_for_another_model_or_dataset_is_detected(tmp_path):
    store = make(tmp_path / "s")
    with pytest.raises(ArtifactError, match="model 'tiny'"):
        store.check_model({"image": ["backbone.v"], "text": NAMES["text"]}, SHAPES, "synscenes")
    with pytest.raises(ArtifactError, match="model 'tiny'"):
        store.check_model(NAMES, {**SHAPES, "backbone.w": [3, 3]}, "synscenes")
    with pytest.raises(ArtifactError, match="dataset 'synscenes'"):
        store.check_model(NAMES, SHAPES, "flickr30k")
    store.check_model(NAMES, SHAPES, "synscenes")  # the right one passes


def test_corrupted_expert_file_is_detected(tmp_path):
    store = make(tmp_path / "s")
    store.save_expert(0, traj())
    path = store.expert_path(0)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ArtifactError, match="corrupted"):
        store.load_expert(0)


def test_missing_store_has_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="run `mmdd buffer` first"):
        TrajectoryStore.open(tmp_path / "nothing")


def test_wrong_shapes_are_rejected(tmp_path):
    store = make(tmp_path / "s")
    bad = traj()
    bad["backbone.w"] = torch.zeros(5, 2, 3)
    with pytest.raises(ValueError, match="shape"):
        store.save_expert(0, bad)


def test_atomic_writes_leave_no_temp_files_and_normal_permissions(tmp_path):
    import os

    from mmdd.utils.io import atomic_write_json

    p = atomic_write_json(tmp_path / "a.json", {"x": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]
