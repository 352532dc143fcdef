"""The reference implementations' replay buffers, to and from mmdd's trajectory store.

MTT-VL, LoRS, RepBlend and PTM-ST (`buffer.py` in each) save their experts as pairs of pickled lists:

    <dir>/img_replay_buffer_<n>.pt   [expert][snapshot][parameter] tensors of the image side
    <dir>/txt_replay_buffer_<n>.pt   the same for the text side

one snapshot per epoch (epoch 0 first), each a list of the module's `parameters()` in their order, without names.
mmdd's store keeps the same numbers as one safetensors file per expert, named, in `ParamLayout` order (the
module's `named_parameters()` order, which is the references' order for the same module).

`export_replay_buffers` writes a store's experts in that layout, so the official distillation scripts read the
same trajectories as mmdd (experiments/parity); `read_replay_buffers` + `import_replay_buffers` bring buffers made
by the official code into a store (e.g. the papers' GPU buffers), checking every shape against the store's manifest.
Buffers are read with `torch.load(weights_only=True)`: nested lists of tensors load, arbitrary pickles are refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from mmdd.errors import ArtifactError
from mmdd.teachers.trajectory_store import TrajectoryStore
from mmdd.utils.io import atomic_write

MODALITY_PREFIX = {"image": "img", "text": "txt"}
_FILE_RE = re.compile(r"^(img|txt)_replay_buffer_(\d+)\.pt$")


def buffer_file(folder: str | Path, modality: str, n: int) -> Path:
    return Path(folder) / f"{MODALITY_PREFIX[modality]}_replay_buffer_{n}.pt"


def expert_snapshots(trajectory: dict[str, torch.Tensor], names: Sequence[str]) -> list[list[torch.Tensor]]:
    """One modality of an expert in the references' layout: [snapshot][parameter], parameters in `names` order."""
    epochs = {int(trajectory[n].shape[0]) for n in names}
    if len(epochs) != 1:
        raise ValueError(f"parameters of one expert have different snapshot counts: {sorted(epochs)}")
    return [[trajectory[n][e].clone() for n in names] for e in range(epochs.pop())]


def export_replay_buffers(store: TrajectoryStore, folder: str | Path, experts: Sequence[int] | None = None,
                          per_file: int = 1) -> list[tuple[Path, Path]]:
    """Write `experts` of `store` (default: every complete one, in order) as replay-buffer files, `per_file` experts
    in each pair of files; returns the (img, txt) paths, file n holding experts[n * per_file : (n + 1) * per_file].
    Every file is written to a temp file and renamed."""
    experts = list(store.completed_experts() if experts is None else experts)
    if not experts:
        raise ArtifactError(f"trajectory store {store.root} has no complete expert to export; run `mmdd buffer` first")
    if per_file < 1:
        raise ValueError(f"per_file must be >= 1, got {per_file}")
    names = store.param_names
    missing = sorted(set(MODALITY_PREFIX) - set(names))
    if missing:
        raise ArtifactError(f"trajectory store {store.root} has no {missing} parameters: replay buffers hold both sides")
    written = []
    for n, first in enumerate(range(0, len(experts), per_file)):
        chunk = [store.load_expert(e) for e in experts[first:first + per_file]]
        pair = []
        for modality in MODALITY_PREFIX:
            trajectories = [expert_snapshots(t, names[modality]) for t in chunk]
            pair.append(atomic_write(buffer_file(folder, modality, n), lambda p, obj=trajectories: torch.save(obj, p)))
        written.append(tuple(pair))
    return written


def replay_buffer_files(folder: str | Path) -> list[tuple[Path, Path]]:
    """The (img, txt) file pairs of a replay-buffer folder, by file number; a number with one side only is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder of replay buffers (img_replay_buffer_<n>.pt files)")
    found: dict[int, dict[str, Path]] = {}
    for p in folder.iterdir():
        m = _FILE_RE.match(p.name)
        if m:
            found.setdefault(int(m.group(2)), {})[m.group(1)] = p
    if not found:
        raise ArtifactError(f"{folder} holds no img_replay_buffer_<n>.pt / txt_replay_buffer_<n>.pt files")
    pairs = []
    for n in sorted(found):
        if set(found[n]) != {"img", "txt"}:
            raise ArtifactError(f"{folder}: replay buffer {n} has only its {list(found[n])[0]} file; the official "
                                "scripts need both img_ and txt_replay_buffer_{n}.pt")
        pairs.append((found[n]["img"], found[n]["txt"]))
    return pairs


def _load(path: Path) -> list:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with objects other than tensors and lists, or a truncated file
        raise ArtifactError(f"{path} is not a replay buffer that loads as lists of tensors ({exc})") from exc
    if not isinstance(obj, list) or not all(isinstance(e, list) for e in obj):
        raise ArtifactError(f"{path} is not a replay buffer: expected [expert][snapshot][parameter] lists")
    return obj


def read_replay_buffers(folder: str | Path) -> list[dict[str, list[list[torch.Tensor]]]]:
    """Every expert of a replay-buffer folder, in file order: [{"image": [snapshot][param], "text": ...}]."""
    experts = []
    for img_path, txt_path in replay_buffer_files(folder):
        img, txt = _load(img_path), _load(txt_path)
        if len(img) != len(txt):
            raise ArtifactError(f"{img_path} holds {len(img)} experts but {txt_path} holds {len(txt)}")
        experts += [{"image": i, "text": t} for i, t in zip(img, txt)]
    return experts


def trajectory_from_snapshots(expert: dict[str, list[list[torch.Tensor]]], store: TrajectoryStore, where: str
                              ) -> dict[str, torch.Tensor]:
    """An expert in the references' layout as the store's {name: [epochs + 1, *shape]} tensors, every count and
    shape checked against the store's manifest (`where` names the expert in errors)."""
    names, shapes = store.param_names, store.manifest["param_shapes"]
    out = {}
    for modality, snapshots in expert.items():
        group = names[modality]
        if len(snapshots) != store.epochs + 1:
            raise ArtifactError(f"{where}: {len(snapshots)} {modality} snapshots, the store records "
                                f"{store.epochs + 1} (epochs 0..{store.epochs})")
        for e, params in enumerate(snapshots):
            if len(params) != len(group):
                raise ArtifactError(f"{where}: snapshot {e} has {len(params)} {modality} parameters, the store's model "
                                    f"has {len(group)}: the buffer was made for another model")
            for n, t in zip(group, params):
                if list(t.shape) != list(shapes[n]):
                    raise ArtifactError(f"{where}: snapshot {e}, {modality} parameter {n!r} has shape {list(t.shape)}, "
                                        f"the store's model has {shapes[n]}: another model or parameter order")
        for i, n in enumerate(group):
            out[n] = torch.stack([params[i] for params in snapshots]).contiguous()
    return out


def import_replay_buffers(folder: str | Path, store: TrajectoryStore, first_expert: int = 0) -> list[int]:
    """Save every expert of a replay-buffer folder into `store` (its manifest says the model's names and shapes) as
    experts first_expert, first_expert + 1, ...; returns their numbers."""
    done = []
    for k, expert in enumerate(read_replay_buffers(folder)):
        idx = first_expert + k
        store.save_expert(idx, trajectory_from_snapshots(expert, store, f"{folder} expert {k}"))
        done.append(idx)
    return done
