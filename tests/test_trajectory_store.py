import json

import pytest
import torch

from helpers import method_settings
from mmdd.errors import ArtifactError, MmddError
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
    make(tmp_path / "s", config_hash="abc").save_expert(0, traj())  # the manifest is written with the first expert
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


def test_snapshots_are_the_flat_rows_of_the_expert_file(tmp_path):
    from mmdd.teachers.trajectory_store import ExpertSnapshots

    store = make(tmp_path / "s", epochs=3)
    t0, t1 = traj(epochs=3, seed=0), traj(epochs=3, seed=1)
    store.save_expert(0, t0)
    store.save_expert(1, t1)
    reader = ExpertSnapshots(store, NAMES, store.completed_experts())
    assert (reader.n_experts, reader.epochs, reader.numel) == (2, 3, {"image": 6, "text": 12})
    start, target = reader.segment(1, 1, 2)
    for m in NAMES:
        assert torch.equal(start[m], flatten_trajectory(t1, NAMES[m])[1])
        assert torch.equal(target[m], flatten_trajectory(t1, NAMES[m])[3])
    only_second = ExpertSnapshots(store, NAMES, [1])  # indices are into the reader's experts
    assert torch.equal(only_second.snapshots(0, [0])[0]["image"], t1["backbone.w"][0].reshape(-1))


def test_reading_snapshots_does_not_hold_the_experts(tmp_path):
    """Ten 23 MB experts: reading one segment from each of them peaks at about what reading ten segments of one
    expert does (two snapshots of 2.2 MB, plus their mapped file pages); loading the experts would hold 23 MB each,
    230 MB in all. The resident set counts mapped file pages, and a kernel that keeps the page cache in large folios
    maps much of a just-written file on the first touch (CI measured 25 MB for one expert's segments), so the bound
    on the absolute peak is two experts, far below ten; the growth from one expert to ten is the sharp check."""
    from mmdd.bench.memory import PeakMemory, reset_peak_rss
    from mmdd.teachers.trajectory_store import ExpertSnapshots

    if not reset_peak_rss():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak resident set")
    names = {"image": ["w"], "text": ["v"]}
    shapes = {"w": [512, 1024], "v": [64, 512]}
    store = TrajectoryStore.create_or_open(tmp_path / "s", dataset="d", model="m", config_hash="h", param_names=names,
                                           param_shapes=shapes, epochs=10, teacher={})
    for e in range(10):
        store.save_expert(e, {n: torch.full([11, *s], float(e)) for n, s in shapes.items()})
    expert_mb = store.expert_path(0).stat().st_size / 2**20
    reader = ExpertSnapshots(store, names, store.completed_experts())

    def peak(experts):
        with PeakMemory(torch.device("cpu")) as pm:
            for e in experts:
                start, target = reader.segment(e, 2, 3)
                assert float(start["image"][0]) == e and float(target["text"][-1]) == e
                del start, target
        return pm.peak_mb

    one, ten = peak([0] * 10), peak(range(10))
    assert expert_mb > 20
    assert ten < 2 * expert_mb and ten - one < 0.25 * expert_mb, (one, ten, expert_mb)


def test_a_store_that_will_not_fit_on_the_disk_is_refused_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from hydra import compose, initialize_config_dir

    from mmdd.errors import MmddError
    from mmdd.models.dual_encoder import build_dual_encoder
    from mmdd.paths import conf_dir
    from mmdd.teachers.store_size import check_store_fits, store_bytes

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("buffer", overrides=[f"buffer_dir={tmp_path / 'store'}", "teacher.num_experts=3",
                                           "teacher.epochs=2"])
    model = build_dual_encoder(cfg.model, 384, 32)
    matched = sum(p.numel() for p in model.parameters())  # convnet_minilm trains (and records) every parameter
    assert store_bytes(cfg, model) == 3 * 3 * matched * 4  # experts x snapshots x matched params x float32
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, store_bytes(cfg, model) - 1))
    with pytest.raises(MmddError, match=r"needs .* more \(3 experts x .*teacher.num_experts"):
        check_store_fits(cfg, model)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, store_bytes(cfg, model)))
    check_store_fits(cfg, model)  # just fits


def test_the_snapshot_cache_serves_repeated_draws_without_reading_and_evicts_the_least_recent(tmp_path):
    from mmdd.teachers.trajectory_store import ExpertSnapshots

    store = make(tmp_path / "s", epochs=3)
    trajectories = [traj(epochs=3, seed=s) for s in range(2)]
    for e, t in enumerate(trajectories):
        store.save_expert(e, t)
    reader = ExpertSnapshots(store, NAMES, store.completed_experts())
    reader.cache_bytes = 3 * reader.snapshot_bytes()  # three snapshots
    for expert, start in [(0, 0), (0, 0), (1, 1), (0, 1)]:
        first, last = reader.segment(expert, start, 1)
        for m in NAMES:
            assert torch.equal(first[m], flatten_trajectory(trajectories[expert], NAMES[m])[start])
            assert torch.equal(last[m], flatten_trajectory(trajectories[expert], NAMES[m])[start + 1])
    # (0,0) (0,1) read; (0,0) (0,1) hit; (1,1) (1,2) read, (1,2) evicts (0,0); (0,1) hits, (0,2) read evicts (1,1)
    assert (reader.reads, reader.hits) == (5, 3)
    assert [k[:2] for k in reader._cache] == [(1, 2), (0, 1), (0, 2)]
    assert reader._cached == 3 * reader.snapshot_bytes()


def test_the_snapshot_cache_setting(monkeypatch):
    from omegaconf import OmegaConf

    from mmdd.methods.trajectory.objective import MatchingSettings, snapshot_cache_bytes

    class Reader:
        n_experts = 20

        def snapshot_bytes(self):
            return 150 * 2**20  # LoRS's nfnet_l0 + text head, about 152 MiB

    settings = method_settings(MatchingSettings, "mtt_vl", syn_steps=2, max_start_epoch=2, expert_epochs=1)
    hw = lambda **kw: OmegaConf.create({"accelerator": "gpu", "devices": 1, **kw})  # noqa: E731
    assert snapshot_cache_bytes(hw(snapshot_cache_mb=64), Reader(), settings) == 64 * 2**20
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert snapshot_cache_bytes(hw(snapshot_cache_mb="auto"), Reader(), settings) == 0  # the CPU: none
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    memory = {"total_memory": 141 * 2**30}  # an H200
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), memory))
    # 20 experts x (start epochs 0, 1 and targets up to 2) = 60 snapshots = 8.8 GiB: within a tenth of 141 GiB
    assert snapshot_cache_bytes(hw(snapshot_cache_mb="auto"), Reader(), settings) == 60 * 150 * 2**20
    memory["total_memory"] = 80 * 2**30  # an H100: a tenth, 8 GiB
    assert snapshot_cache_bytes(hw(snapshot_cache_mb="auto"), Reader(), settings) == 8 * 2**30
    with pytest.raises(MmddError, match="hardware.snapshot_cache_mb must be a number of MB or auto"):
        snapshot_cache_bytes(hw(snapshot_cache_mb="lots"), Reader(), settings)
