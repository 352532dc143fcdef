"""Trajectory store: expert parameter snapshots (one per epoch) on disk.

Layout (readable without mmdd: JSON + safetensors):
    <root>/manifest.json           what the store is: dataset, model, teacher config, param names/shapes
    <root>/expert_000.safetensors  one tensor per trainable parameter, shape [epochs+1, *param_shape]

An expert file appears only when the expert is complete (atomic rename), so a killed
`mmdd buffer` keeps every finished expert and a rerun skips them. An expert file that is damaged
afterwards (truncated by a copy, overwritten) is not loaded: reading it raises ArtifactError naming
the file, and a rerun of `mmdd buffer` moves it aside (to expert_NNN.safetensors.corrupt, bytes
kept) and trains that expert again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mmdd.errors import ArtifactError
from mmdd.models.dual_encoder import frozen_backbone_fingerprint
from mmdd.identity import data_identity, data_location, teachers_identity
from mmdd.utils.io import atomic_write, atomic_write_json, read_manifest, stable_hash

FORMAT = "mmdd-trajectory-store"
VERSION = 1
_EXPERT_RE = re.compile(r"^expert_(\d+)\.safetensors$")

log = logging.getLogger(__name__)


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
        data_hash: str | None = None,
        identity: dict | None = None,
        data_location: dict | None = None,
        backbone_fingerprint: str | None = None,
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
            "data_hash": data_hash,  # what the data is (not where): mmdd.identity.data_identity
            # everything that defines the teachers (mmdd.identity.teachers_identity): readers must share it
            "identity": identity,
            "data_location": data_location,  # where the data was read from (recorded, not enforced)
            # a frozen backbone's weights (mmdd.models.dual_encoder.backbone_fingerprint); None when it trains
            "backbone_fingerprint": backbone_fingerprint,
        }
        if (root / "manifest.json").exists():
            store = cls.open(root)
            old = store.manifest
            from mmdd.utils.config import config_differences

            # The identity leaves out how many experts were asked for, so a store is extended with more experts
            # (teacher.num_experts=20 after 10); stores older than identities fall back to the config hash.
            if old.get("identity") is not None and identity is not None:
                diffs = config_differences(old["identity"], identity)
                differs = bool(diffs)
            else:
                diffs = [k for k in ("dataset", "model", "epochs", "teacher", "param_shapes")
                         if old.get(k) != manifest[k]]
                differs = old.get("config_hash") != config_hash
            if differs:
                raise ArtifactError(
                    f"trajectory store {root} was made by another configuration (differs in "
                    f"{'; '.join(diffs) if diffs else 'other settings'}; store -> this run). "
                    "Point buffer_dir at a new directory, or delete the old store."
                )
            store.set_aside_corrupt_experts()
            return store
        # The manifest is written with the first expert (save_expert): a first run that fails before any expert
        # is complete leaves no manifest behind to refuse the next run with other settings.
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, manifest)

    @classmethod
    def open(cls, root: str | Path) -> "TrajectoryStore":
        root = Path(root)
        manifest = read_manifest(root, FORMAT, "trajectory store",
                                 "run `mmdd buffer` first, or point buffer_dir at a directory it wrote")
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
        if not (self.root / "manifest.json").exists():
            atomic_write_json(self.root / "manifest.json", self.manifest)
        return atomic_write(self.expert_path(idx), lambda p: save_file(tensors, str(p), metadata=meta))

    def _expected_shapes(self) -> dict[str, list[int]]:
        return {n: [self.epochs + 1] + list(self.manifest["param_shapes"][n])
                for names in self.param_names.values() for n in names}

    def expert_problem(self, idx: int) -> str | None:
        """Why expert `idx`'s file cannot be used (unreadable header, truncated, a parameter missing or of another
        shape than the manifest's), or None when it is intact. Reads the header only, not the tensors."""
        try:
            with safe_open(str(self.expert_path(idx)), framework="pt") as f:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            return f"unreadable safetensors file: {exc}"
        for name, want in self._expected_shapes().items():
            if name not in shapes:
                return f"it lacks parameter {name!r}"
            if shapes[name] != want:
                return f"parameter {name!r} has shape {shapes[name]}, the manifest says {want}"
        return None

    def set_aside_corrupt_experts(self) -> list[Path]:
        """Rename every expert file that cannot be used to expert_NNN.safetensors.corrupt (its bytes are kept), so
        that `mmdd buffer` counts the expert as not complete and trains it again. Returns the new paths."""
        moved = []
        for idx in self.completed_experts():
            problem = self.expert_problem(idx)
            if problem is None:
                continue
            path = self.expert_path(idx)
            dest = path.with_name(path.name + ".corrupt")
            k = 1
            while dest.exists():
                dest = path.with_name(f"{path.name}.corrupt{k}")
                k += 1
            try:
                path.rename(dest)
            except FileNotFoundError:  # another `mmdd buffer` job on this store moved it first
                continue
            log.warning("%s is corrupted (%s); moved it to %s, expert %d will be trained again", path, problem,
                        dest.name, idx)
            moved.append(dest)
        return moved

    def load_expert(self, idx: int) -> dict[str, torch.Tensor]:
        path = self.expert_path(idx)
        fix = ("rerun `mmdd buffer` with the settings that made this store: it moves the damaged file aside "
               "(to .corrupt) and trains that expert again")
        if not path.exists():
            raise ArtifactError(f"{path} is missing; rerun `mmdd buffer` to complete the store")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{path} is corrupted ({exc}), e.g. truncated by an interrupted copy; {fix}") from exc
        for name, want in self._expected_shapes().items():
            if name not in tensors:
                raise ArtifactError(f"{path} lacks parameter {name!r}; {fix}")
            if list(tensors[name].shape) != want:
                raise ArtifactError(f"{path}: parameter {name!r} has shape {list(tensors[name].shape)}, but the store's "
                                    f"manifest says {want}; {fix}")
        return tensors

    def check_identity(self, identity: dict, backbone_fingerprint: str | None, data_location: dict | None = None) -> None:
        """Refuse a store whose teachers were defined otherwise than this run's (data, model, teacher settings,
        augmentation) or stood on another frozen backbone, naming each differing key with both values. Stores
        written before these were recorded are not checked here (check_model still is)."""
        from mmdd.utils.config import config_differences

        recorded = self.manifest.get("identity")
        if recorded is not None:
            diffs = config_differences(recorded, identity)
            if diffs:
                raise ArtifactError(
                    f"trajectory store {self.root} was made with other settings than this run's ({'; '.join(diffs)}; "
                    "store -> this run): use the settings it was made with, or build a store for these settings with "
                    "`mmdd buffer` (the default buffer_dir already names one per setting)")
        from mmdd.models.dual_encoder import check_same_frozen_backbone

        check_same_frozen_backbone(f"trajectory store {self.root} (the heads' trajectories)",
                                   self.manifest.get("backbone_fingerprint"), backbone_fingerprint)
        where = self.manifest.get("data_location")
        if where and data_location and where != data_location:
            log.warning("trajectory store %s was recorded on data read from %s; this run reads %s (same identity: "
                        "format, annotation files, sizes)", self.root, where, data_location)

    def check_model(self, param_names: dict[str, list[str]], param_shapes: dict[str, list[int]], dataset: str,
                    data_hash: str | None = None) -> None:
        """Raise a clear error when the store was recorded for another model or dataset."""
        if self.manifest.get("dataset") != dataset:
            raise ArtifactError(
                f"trajectory store {self.root} was made on dataset {self.manifest.get('dataset')!r}, "
                f"not {dataset!r} (data.name); set buffer_dir to a store recorded on {dataset!r}, or build one "
                "with `mmdd buffer` and this run's data and model settings"
            )
        recorded = self.manifest.get("data_hash")
        if data_hash and recorded and recorded != data_hash:
            raise ArtifactError(
                f"trajectory store {self.root} was recorded on other contents of dataset {dataset!r} (data hash "
                f"{recorded} != {data_hash}: other data.generate sizes, annotation files or pre-processing); use the "
                "data settings it was made with, or build a store for this data with `mmdd buffer` and another buffer_dir"
            )
        if self.param_names != param_names or any(
            list(self.manifest["param_shapes"].get(n, [])) != list(s) for n, s in param_shapes.items()
        ):
            raise ArtifactError(
                f"trajectory store {self.root} was recorded for model {self.manifest.get('model')!r} whose "
                "trainable parameters differ from this model's (names or shapes); use the same `model` config "
                "as `mmdd buffer`, or build a store for this model"
            )


class ExpertSnapshots:
    """Single snapshots of a store's experts, read on demand: distillation needs only the drawn expert's start and
    target per iteration, so holding every trajectory (20 experts x 11 snapshots of a whole NFNet-L0 + text head:
    about 35 GB) is never needed. Each read opens the expert's safetensors file memory-mapped, copies the requested
    epochs' rows of every parameter into one flat vector per modality and closes it again, so neither host nor device
    memory grows with the number of experts (the OS page cache keeps recently read files warm)."""

    def __init__(self, store: TrajectoryStore, names: dict[str, list[str]], experts: Sequence[int],
                 dtype: torch.dtype = torch.float32):
        if not experts:
            raise ArtifactError(f"trajectory store {store.root} has no complete expert; run `mmdd buffer` with the "
                                "settings that made it")
        self.store, self.names, self.experts, self.dtype = store, names, list(experts), dtype
        shapes = store.manifest["param_shapes"]
        self.numel = {m: sum(_numel(shapes[n]) for n in group) for m, group in names.items()}
        # Snapshots kept where they were sent (a GPU) for the next draws of the same expert and epoch, least recently
        # used first out, up to `cache_bytes` (hardware.snapshot_cache_mb): a hit skips the read, the two host copies
        # and the host-to-device transfer, which a GPU waits for. 0: every segment is read anew.
        self.cache_bytes = 0
        self._cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._cached = 0
        self.hits = self.reads = 0

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def epochs(self) -> int:
        return self.store.epochs

    def snapshot_bytes(self) -> int:
        """Bytes of one snapshot (every modality) in this reader's dtype."""
        return sum(self.numel.values()) * torch.empty((), dtype=self.dtype).element_size()

    @contextmanager
    def _open(self, expert: int):
        """Expert number `expert`'s file, opened memory-mapped; a file that cannot be read is an ArtifactError."""
        path = self.store.expert_path(self.experts[expert])
        try:
            with safe_open(str(path), framework="pt") as f:
                yield f
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{path} cannot be read ({exc}), e.g. deleted or truncated while in use; rerun "
                                "`mmdd buffer` with the settings that made the store: it trains that expert again") from exc

    def _rows(self, f, expert: int, name: str, epochs: Sequence[int]) -> list[torch.Tensor]:
        """Parameter `name`'s value at each of `epochs` (a subclass may derive them: methods.trajectory.shortcut)."""
        return [f.get_slice(name)[epoch] for epoch in epochs]

    def snapshots(self, expert: int, epochs: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """The flat parameters ({modality: [P]}) of expert number `expert` (an index into this reader's experts)
        at each of `epochs`; only those rows of the file are read."""
        out = [{m: torch.empty(self.numel[m], dtype=self.dtype) for m in self.names} for _ in epochs]
        with self._open(expert) as f:
            for m, group in self.names.items():
                offset = 0
                for n in group:
                    for flats, row in zip(out, self._rows(f, expert, n, epochs)):
                        flats[m][offset:offset + row.numel()].copy_(row.reshape(-1))
                    offset += row.numel()
        return out

    def segment(self, expert: int, start: int, span: int, device=None, dtype: torch.dtype | None = None):
        """(start, target) flat parameters of one matching segment, moved to `device` and cast to `dtype` (a float64
        run, hardware.precision=64-true, matches float32 snapshots in double precision)."""
        return tuple(self._snapshot_on(expert, epoch, device, dtype) for epoch in (start, start + span))

    def _snapshot_on(self, expert: int, epoch: int, device, dtype) -> dict[str, torch.Tensor]:
        """One snapshot on `device`, from the cache, or read (and cached when it fits: the matching only reads it,
        the student starts from a clone)."""
        key = (expert, epoch, str(torch.device(device)) if device is not None else "cpu", dtype)
        if key in self._cache:
            self._cache.move_to_end(key)
            self.hits += 1
            return self._cache[key]
        self.reads += 1
        flat = {m: t.to(device=device, dtype=dtype) for m, t in self.snapshots(expert, [epoch])[0].items()}
        size = sum(t.numel() * t.element_size() for t in flat.values())
        if size <= self.cache_bytes:
            while self._cache and self._cached + size > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= sum(t.numel() * t.element_size() for t in old.values())
            self._cache[key] = flat
            self._cached += size
        return flat

    def check_intact(self) -> None:
        """Refuse damaged expert files up front (headers only), naming the file and the fix."""
        for idx in self.experts:
            problem = self.store.expert_problem(idx)
            if problem is not None:
                raise ArtifactError(f"{self.store.expert_path(idx)} is corrupted ({problem}), e.g. truncated by an "
                                    "interrupted copy; rerun `mmdd buffer` with the settings that made this store: it "
                                    "moves the damaged file aside (to .corrupt) and trains that expert again")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def flatten_trajectory(traj: dict[str, torch.Tensor], names: list[str], dtype=torch.float32) -> torch.Tensor:
    """[epochs+1, P] flat trajectory of one modality (params concatenated in `names` order)."""
    return torch.cat([traj[n].reshape(traj[n].shape[0], -1).to(dtype) for n in names], dim=1)


@dataclass(frozen=True, kw_only=True)
class ExpectedStore:
    """The trajectory store a run reads (cfg.buffer_dir) and what its teachers must share with the run, checked when
    it is opened: the model's parameters, the data (its identity; where it lives is recorded beside it) and the
    teacher settings; `num_experts` is teacher.num_experts, how many complete experts a run needs."""

    path: Path
    data_name: str
    data_key: str  # stable_hash(data_identity(cfg.data))
    teachers: dict  # mmdd.identity.teachers_identity(cfg)
    data_location: dict
    num_experts: int

    @classmethod
    def of(cls, cfg) -> "ExpectedStore":
        return cls(path=Path(str(cfg.buffer_dir)), data_name=str(cfg.data.name),
                   data_key=stable_hash(data_identity(cfg.data)), teachers=teachers_identity(cfg),
                   data_location=data_location(cfg.data), num_experts=int(cfg.teacher.num_experts))

    def open(self, model, max_experts: int | None = None, fingerprint: str | None = None) -> "ExpertSnapshots":
        return open_checked_trajectories(self, model, max_experts, fingerprint)


def open_checked_trajectories(expected: ExpectedStore, model, max_experts: int | None = None,
                              fingerprint: str | None = None) -> ExpertSnapshots:
    """The store `expected` names, checked against it, `model` (and its frozen backbone's `fingerprint`, computed
    when not given), as a reader of single snapshots (the trajectories stay on disk: see ExpertSnapshots)."""
    store = TrajectoryStore.open(expected.path)
    names = model.modality_parameter_names()
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    store.check_model(names, {n: shapes[n] for g in names.values() for n in g}, expected.data_name,
                      expected.data_key)
    fingerprint = fingerprint or frozen_backbone_fingerprint(model)
    store.check_identity(expected.teachers, fingerprint, expected.data_location)
    experts = store.completed_experts()
    if not experts:
        raise ArtifactError(f"trajectory store {store.root} has no complete expert yet (none of its "
                            "expert_NNN.safetensors is written): run `mmdd buffer` with the same data, model and "
                            "teacher settings to train them, then distill")
    experts = check_enough_experts(store, experts, expected.num_experts, max_experts)
    reader = ExpertSnapshots(store, names, experts)
    reader.check_intact()
    log.info("using %d experts x %d epochs from %s (%s params; per iteration 2 snapshots, %.1f MB, are read)",
             reader.n_experts, reader.epochs, store.root, reader.numel, 2 * reader.snapshot_bytes() / 2**20)
    return reader


def check_enough_experts(store: TrajectoryStore, complete: list[int], wanted: int, max_experts: int | None
                         ) -> list[int]:
    """The experts to distil from: all `wanted` (teacher.num_experts) of them, or the first `max_experts` complete
    ones when method.max_experts asks for fewer. A store still being filled is refused, not used silently."""
    need = wanted if max_experts is None else int(max_experts)
    if len(complete) >= need:
        return complete[:need]
    missing = [e for e in range(max(need, wanted)) if e not in complete]
    listed = ", ".join(str(e) for e in missing[:10]) + (", ..." if len(missing) > 10 else "")
    raise ArtifactError(
        f"trajectory store {store.root} has {len(complete)} of the {need} experts this run needs complete (missing: "
        f"{listed}): run `mmdd buffer` with the same settings to complete them (several jobs can share the work), "
        f"or set method.max_experts={len(complete)} to distil from the complete ones")
