"""Trajectory store: expert parameter snapshots (one per epoch) on disk.

Layout (readable without mmdd: JSON + safetensors):
    <root>/manifest.json           what the store is: dataset, model, teacher config, param names/shapes
    <root>/expert_000.safetensors  one tensor per trainable parameter, shape [epochs+1, *param_shape]

An expert file appears only when the expert is complete (atomic rename), so a killed
`mmdd buffer` keeps every finished expert and a rerun skips them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmdd.errors import ArtifactError
from mmdd.utils.io import atomic_write, atomic_write_json

FORMAT = "mmdd-trajectory-store"
VERSION = 1
_EXPERT_RE = re.compile(r"^expert_(\d+)\.safetensors$")


class TrajectoryStore:
    def __init__(self, root: str | Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    # -- creation / opening ---------------------------------------------------------------
    @classmethod
    def create_or_open(
        cls,
        root: str | Path,
        *,
        dataset: str,
        model: str,
        config_hash: str,
        param_names: dict[str, list[str]],
        param_shapes: dict[str, list[int]],
        epochs: int,
        teacher: dict,
    ) -> "TrajectoryStore":
        root = Path(root)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dataset": dataset,
            "model": model,
            "config_hash": config_hash,
            "epochs": int(epochs),
            "param_names": param_names,
            "param_shapes": {k: list(v) for k, v in param_shapes.items()},
            "teacher": teacher,
        }
        if (root / "manifest.json").exists():
            store = cls.open(root)
            old = store.manifest
            if old.get("config_hash") != config_hash:
                diffs = [k for k in ("dataset", "model", "epochs", "teacher", "param_shapes") if old.get(k) != manifest[k]]
                raise ArtifactError(
                    f"trajectory store {root} was made by another configuration "
                    f"(config hash {old.get('config_hash')} != {config_hash}; differs in {diffs or 'other settings'}). "
                    "Point buffer_dir at a new directory, or delete the old store."
                )
            return store
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / "manifest.json", manifest)
        return cls(root, manifest)

    @classmethod
    def open(cls, root: str | Path) -> "TrajectoryStore":
        root = Path(root)
        path = root / "manifest.json"
        if not path.exists():
            raise ArtifactError(f"no trajectory store at {root} (missing manifest.json); run `mmdd buffer` first")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path} is not valid JSON ({exc}); delete the store and rerun `mmdd buffer`") from exc
        if manifest.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not a trajectory store manifest (format={manifest.get('format')!r})")
        return cls(root, manifest)

    # -- contents ---------------------------------------------------------------------------
    @property
    def epochs(self) -> int:
        return int(self.manifest["epochs"])

    @property
    def param_names(self) -> dict[str, list[str]]:
        return self.manifest["param_names"]

    def expert_path(self, idx: int) -> Path:
        return self.root / f"expert_{idx:03d}.safetensors"

    def completed_experts(self) -> list[int]:
        found = []
        for p in self.root.iterdir():
            m = _EXPERT_RE.match(p.name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def save_expert(self, idx: int, trajectory: dict[str, torch.Tensor]) -> Path:
        expected = {n for names in self.param_names.values() for n in names}
        if set(trajectory) != expected:
            raise ValueError(f"trajectory params {sorted(set(trajectory) ^ expected)[:5]} do not match the manifest")
        for name, t in trajectory.items():
            want = [self.epochs + 1] + self.manifest["param_shapes"][name]
            if list(t.shape) != want:
                raise ValueError(f"trajectory of {name} has shape {list(t.shape)}, expected {want}")
        tensors = {k: v.detach().cpu().contiguous() for k, v in trajectory.items()}
        meta = {"expert": str(idx), "config_hash": self.manifest["config_hash"]}
        return atomic_write(self.expert_path(idx), lambda p: save_file(tensors, str(p), metadata=meta))

    def load_expert(self, idx: int) -> dict[str, torch.Tensor]:
        path = self.expert_path(idx)
        if not path.exists():
            raise ArtifactError(f"{path} is missing; rerun `mmdd buffer` to complete the store")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{path} is corrupted ({exc}); delete it and rerun `mmdd buffer`") from exc
        for name in (n for names in self.param_names.values() for n in names):
            if name not in tensors:
                raise ArtifactError(f"{path} lacks parameter {name!r}; delete it and rerun `mmdd buffer`")
        return tensors

    def check_model(self, param_names: dict[str, list[str]], param_shapes: dict[str, list[int]], dataset: str) -> None:
        """Raise a clear error when the store was recorded for another model or dataset."""
        if self.manifest.get("dataset") != dataset:
            raise ArtifactError(
                f"trajectory store {self.root} was made on dataset {self.manifest.get('dataset')!r}, "
                f"not {dataset!r}; set buffer_dir to a store for this dataset or run `mmdd buffer data={dataset}`"
            )
        if self.param_names != param_names or any(
            list(self.manifest["param_shapes"].get(n, [])) != list(s) for n, s in param_shapes.items()
        ):
            raise ArtifactError(
                f"trajectory store {self.root} was recorded for model {self.manifest.get('model')!r} whose "
                "trainable parameters differ from this model's (names or shapes); use the same `model` config "
                "as `mmdd buffer`, or build a store for this model"
            )


def flatten_trajectory(traj: dict[str, torch.Tensor], names: list[str], dtype=torch.float32) -> torch.Tensor:
    """[epochs+1, P] flat trajectory of one modality (params concatenated in `names` order)."""
    return torch.cat([traj[n].reshape(traj[n].shape[0], -1).to(dtype) for n in names], dim=1)
