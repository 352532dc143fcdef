"""The official code's replay buffers <-> mmdd's trajectory store (mmdd.teachers.replay_buffer)."""

import pickle

import pytest
import torch

from mmdd.errors import ArtifactError
from mmdd.models.heads import ProjectionHead
from mmdd.teachers.replay_buffer import (
    buffer_file,
    export_replay_buffers,
    import_replay_buffers,
    read_replay_buffers,
)
from mmdd.teachers.trajectory_store import TrajectoryStore

EPOCHS = 3


class Payload:
    """An object a pickle may carry besides tensors (code could run on loading)."""


def head_layout():
    """A real module on each side: the text head is the references' ProjectionHead (768 -> 2304 in the papers)."""
    image = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    text = ProjectionHead(6, 5)
    named = {"image": {f"backbone.{n}": p for n, p in image.named_parameters()},
             "text": {f"text_head.{n}": p for n, p in text.named_parameters()}}
    return (image, text), named


def make_store(root, named):
    names = {m: list(group) for m, group in named.items()}
    shapes = {n: list(p.shape) for group in named.values() for n, p in group.items()}
    return TrajectoryStore.create_or_open(root, dataset="synscenes", model="tiny", config_hash="h", param_names=names,
                                          param_shapes=shapes, epochs=EPOCHS, teacher={"lr": 0.1})


def fill(store, named, experts):
    made = {}
    for e in range(experts):
        g = torch.Generator().manual_seed(e)
        made[e] = {n: torch.randn([EPOCHS + 1, *p.shape], generator=g) for group in named.values()
                   for n, p in group.items()}
        store.save_expert(e, made[e])
    return made


@pytest.mark.parametrize("per_file", [1, 2])
def test_store_to_replay_buffers_and_back_is_exact(tmp_path, per_file):
    (image, text), named = head_layout()
    store = make_store(tmp_path / "store", named)
    made = fill(store, named, 3)
    files = export_replay_buffers(store, tmp_path / "buffers", per_file=per_file)
    assert len(files) == (3 if per_file == 1 else 2)
    back = make_store(tmp_path / "back", named)
    assert import_replay_buffers(tmp_path / "buffers", back) == [0, 1, 2]
    for e in range(3):
        loaded = back.load_expert(e)
        for n, t in made[e].items():
            assert torch.equal(loaded[n], t), n  # bit for bit
    # No temp files are left beside the buffers.
    assert sorted(p.name for p in (tmp_path / "buffers").iterdir()) == sorted(
        p.name for pair in files for p in pair)


def test_replay_buffer_layout_is_the_references(tmp_path):
    """What the official buffer.py writes: [expert][epoch][parameter] in the module's parameters() order, as plain
    tensors that torch.load(weights_only=True) reads."""
    (image, text), named = head_layout()
    store = make_store(tmp_path / "store", named)
    made = fill(store, named, 1)
    export_replay_buffers(store, tmp_path / "buffers")
    img = torch.load(buffer_file(tmp_path / "buffers", "image", 0), weights_only=True)
    txt = torch.load(buffer_file(tmp_path / "buffers", "text", 0), weights_only=True)
    assert len(img) == 1 and len(img[0]) == EPOCHS + 1
    for module, snapshots, prefix in ((image, img[0], "backbone."), (text, txt[0], "text_head.")):
        names = [prefix + n for n, _ in module.named_parameters()]
        assert [tuple(t.shape) for t in snapshots[2]] == [tuple(p.shape) for p in module.parameters()]
        for t, n in zip(snapshots[2], names):
            assert torch.equal(t, made[0][n][2])


def test_bad_replay_buffers_are_refused_with_the_file_named(tmp_path):
    (image, text), named = head_layout()
    store = make_store(tmp_path / "store", named)
    fill(store, named, 1)
    folder = tmp_path / "buffers"
    export_replay_buffers(store, folder)
    other = make_store(tmp_path / "other", {"image": named["image"],
                                           "text": {f"text_head.{n}": p for n, p in ProjectionHead(6, 7).named_parameters()}})
    with pytest.raises(ArtifactError, match="txt|text parameter"):
        import_replay_buffers(folder, other)
    # One side missing.
    buffer_file(folder, "text", 0).rename(tmp_path / "moved.pt")
    with pytest.raises(ArtifactError, match="only its img file"):
        read_replay_buffers(folder)
    # A pickle holding more than tensors is not unpickled.
    buffer_file(folder, "image", 0).unlink()
    with open(buffer_file(folder, "image", 0), "wb") as f:
        pickle.dump([[Payload()]], f)
    (tmp_path / "moved.pt").rename(buffer_file(folder, "text", 0))
    with pytest.raises(ArtifactError, match="img_replay_buffer_0.pt is not a replay buffer"):
        read_replay_buffers(folder)
