"""What a method is handed for one distillation: a `MethodContext`, built once by the distill stage from the config.

A method reads typed fields (the train split, whose images come normalised; the budget and seed; a model factory;
the trajectory store it may read; the hardware; how to resume and how often to save) instead of walking the whole
config, and writes a set only through `context.save_set`, the one place a set and its manifest are written. The
config stays inside `SetRecords`, which derives from it what a set's records hold (its identity, config hash and
manifest); phased methods get each phase's context from `for_phase`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from omegaconf import open_dict

from mmdd.data.splits import SplitData, loader_options
from mmdd.data.transforms import AugmentConfig, augment_config
from mmdd.identity import data_identity, distill_identity, model_identity
from mmdd.config_schema import whole_budget
from mmdd.data.annotations import Split
from mmdd.errors import MmddError
from mmdd.models.dual_encoder import build_dual_encoder
from mmdd.synthetic.synthetic_set import SyntheticSet, nearest_captions, save_grid
from mmdd.teachers.trajectory_store import ExpectedStore
from mmdd.utils.config import config_hash, to_plain
from mmdd.utils.draws import draws_hooked
from mmdd.utils.io import stable_hash
from mmdd.utils.seed import phase_seed
from mmdd.utils.trainer import build_trainer, process_device

log = logging.getLogger(__name__)


def check_budget(budget, train: SplitData | Split) -> int:
    """`budget` (the config value as given: pass `cfg.budget` itself, before any int()) as an int, checked to be
    a whole number of pairs within 1..train images."""
    budget = whole_budget(budget)
    n = train.num_images
    if budget < 1:
        raise MmddError(f"budget={budget}: the synthetic set needs at least one pair; set budget=<positive integer>")
    if budget > n:
        raise MmddError(
            f"budget={budget} is larger than the train split ({n} images); lower `budget` or use a larger dataset"
        )
    return budget


@dataclass(frozen=True)
class ModelFactory:
    """Builds fresh models of `model` (cfg.model) for this data: its caption embeddings' width and image size."""

    config: Any
    text_dim: int
    image_size: int

    def build(self):
        return build_dual_encoder(self.config, self.text_dim, self.image_size)

    @property
    def text_encoder(self) -> str:
        """model.text.name_or_path: what the caption embeddings come from."""
        return str(self.config.text.name_or_path)


@dataclass(frozen=True)
class TeacherTraining:
    """How the store's experts were trained (conf/teacher with the data's training settings), for a method that
    trains a model the same way (the forgetting coreset)."""

    settings: Any  # cfg.teacher: lr, momentum, weight_decay, batch_size, epochs, ...
    augment: AugmentConfig  # data.augment when teacher.augment, else off
    unit: str  # data.train_unit: caption or image
    loader: dict  # DataLoader options (workers, pinned memory, prefetch) from conf/data/_loader.yaml


SANE_RANGE = 100.0  # a set's values beyond this many of the real data's standard deviations are not data any more


def value_range(syn: SyntheticSet, train: SplitData) -> dict:
    """How far the set's values are from the real data's, in the real data's standard deviations: images are
    normalised (per channel, std 1 on real images); texts are measured from the train captions' mean embedding in
    units of their overall std (one number: some encoders have dimensions that barely vary). `out_of_range` when
    either exceeds SANE_RANGE (e.g. an outer learning rate far too high)."""
    images = float(syn.images.detach().abs().max()) if len(syn) else 0.0
    mean, std = train.text_emb.mean(0), float(train.text_emb.std()) or 1.0
    texts = float((syn.texts.detach().cpu() - mean).abs().max()) / std if len(syn) else 0.0
    return {"images_max_std": images, "texts_max_std": texts,
            "out_of_range": not (images <= SANE_RANGE and texts <= SANE_RANGE)}  # NaN counts as out of range


@dataclass(frozen=True)
class Resume:
    """`resume` (conf/distill.yaml), read in one place: `auto` (or true) continues this run's own checkpoint if there
    is one (a rerun in the same directory, a requeued SLURM job); `false` (or none) starts over; anything else is a
    checkpoint file or a synthetic-set directory to start from."""

    setting: str

    @classmethod
    def of(cls, resume) -> "Resume":
        return resume if isinstance(resume, Resume) else cls(str(resume))  # YAML reads `resume: false` as a bool

    @property
    def fresh(self) -> bool:
        return self.setting.lower() in ("none", "false")

    @property
    def auto(self) -> bool:
        return self.setting.lower() in ("auto", "true")

    @property
    def path(self) -> Path | None:
        return None if self.fresh or self.auto else Path(self.setting)


class SetRecords:
    """What a distillation's records say about it, from its config: its identity (what a checkpoint may resume
    into), and the manifest every set it writes carries (method, budget, seed, data, model, config hash)."""

    def __init__(self, cfg):
        self._cfg = cfg

    @property
    def identity(self) -> dict:
        return distill_identity(self._cfg)

    def phase_identity(self) -> str:
        """A phase's identity as its complete set records it (a rerun skips a phase whose set says the same)."""
        return stable_hash(distill_identity(self._cfg))

    def manifest(self, syn: SyntheticSet, train: SplitData, training: dict, extra: dict) -> dict:
        cfg = self._cfg
        return {
            "method": str(cfg.method.name),
            "budget": cfg.budget,
            "seed": cfg.seed,
            "dataset": str(cfg.data.name),
            "text_encoder": str(cfg.model.text.name_or_path),
            "text_pooling": str(cfg.model.text.pooling),
            "image_size": cfg.data.image_size,
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
            "config_hash": config_hash(cfg),
            # what the set was distilled on: evaluate refuses other data unless asked (allow_other_dataset=true)
            "identity": {"data": data_identity(cfg.data), "model": model_identity(cfg.model)},
            **training,  # inner_loss, label_temperature: how its students train (Method.manifest_fields)
            "value_range": value_range(syn, train),
            **extra,
        }

    def save(self, syn: SyntheticSet, train: SplitData, out_dir: Path, training: dict, extra: dict) -> Path:
        """Write the set with its manifest, the nearest real caption per text and an image grid (atomically)."""
        out_dir = Path(out_dir)
        manifest = self.manifest(syn, train, training, extra)
        r = manifest["value_range"]
        if r["out_of_range"]:
            log.warning("the synthetic set in %s has values up to %.3g (images) / %.3g (texts) standard deviations of "
                        "the real data's, beyond %g: it no longer looks like data (an outer learning rate too high?); "
                        "recorded in its manifest (value_range)", out_dir, r["images_max_std"], r["texts_max_std"],
                        SANE_RANGE)
        syn.save(out_dir, manifest, nearest_captions(syn.texts, train.text_emb, train.split.captions))
        save_grid(syn.images, train.mean, train.std, out_dir / "grid.png")
        return out_dir

    def changed(self, **values) -> "SetRecords":
        """The records of a run that differs from this one in top-level `values` (a phase's budget, seed, resume,
        draws folders, initial set)."""
        cfg = copy.deepcopy(self._cfg)
        with open_dict(cfg):
            for key, value in values.items():
                cfg[key] = value
        return SetRecords(cfg)

    @property
    def config(self):
        """The config the records are made from (for Hydra-level tools such as the draws hooks; methods read the
        context's fields)."""
        return self._cfg


@dataclass(frozen=True, kw_only=True)
class MethodContext:
    """Everything a method is handed for one distillation (see the module docstring)."""

    train: SplitData  # the real training split; train.normalised(idx) gives images as the models see them
    budget: int  # pairs of storage, checked against the train split (S, where learned, costs one)
    seed: int
    out_dir: Path  # where the set, its checkpoint and figures go
    loggers: list
    hardware: Any  # conf/hardware: devices, precision, threads, inference_batch, speed switches
    model: ModelFactory
    store: ExpectedStore  # the trajectory store at buffer_dir, for methods that read teachers
    teacher: TeacherTraining
    augment: AugmentConfig  # data.augment (init=reference draws the initial pairs through it)
    resume: Resume
    init_from: Path | None  # start from a saved set instead of the method's own initialisation
    draws: Any  # the parity hooks (draws.record / draws.replay), or None
    # How a distillation saves and stops; None in `mmdd bench`, which times iterations without saving or resuming.
    save_every: int | None  # iterations between checkpoints (0: only at the end)
    diagnostics_every: int  # iterations between modality-collapse probes (0: none)
    max_nonfinite: int | None  # non-finite steps in a row (each skipped) before a run stops
    cache_dir: Path  # for caches that outlive the run (frozen backbones' features)
    records: SetRecords
    trainer: Callable  # (loggers, callbacks, **trainer overrides) -> lightning Trainer: conf/trainer with the hardware

    @classmethod
    def of(cls, cfg, train: SplitData, out_dir: str | Path, loggers: list | None = None) -> "MethodContext":
        """The context of the run `cfg` describes (the distill stage builds it once; tests and tools the same way)."""
        hardware = cfg.hardware
        teacher = cfg.teacher
        augment = augment_config(cfg.data.get("augment"))
        return cls(
            train=train, budget=check_budget(cfg.budget, train), seed=int(cfg.seed), out_dir=Path(out_dir),
            loggers=list(loggers or []), hardware=hardware,
            model=ModelFactory(cfg.model, int(train.text_emb.shape[1]), int(cfg.data.image_size)),
            store=ExpectedStore.of(cfg),
            teacher=TeacherTraining(teacher, augment if teacher.augment else augment_config(None),
                                    str(cfg.data.train_unit),
                                    loader_options(cfg.data, process_device(hardware).type == "cuda")),
            # `mmdd bench` has no resume, init_from, draws, save_every or max_nonfinite: a fresh run without them
            augment=augment, resume=Resume.of(cfg.get("resume", False)),
            init_from=Path(str(cfg.init_from)) if cfg.get("init_from") else None,
            draws=cfg.get("draws"), save_every=cfg.get("save_every"), diagnostics_every=int(cfg.diagnostics_every),
            max_nonfinite=cfg.get("max_nonfinite"), cache_dir=Path(str(cfg.paths.cache_dir)),
            records=SetRecords(cfg), trainer=partial(build_trainer, cfg))

    @property
    def data_key(self) -> str:
        """The data's identity hash (keys the caches that outlive the run), as the store is checked against."""
        return self.store.data_key

    @property
    def device(self):
        """This process's device (its own GPU under a multi-process run)."""
        return process_device(self.hardware)

    @property
    def draws_hooked(self) -> bool:
        """Whether draws.record / draws.replay (the parity hooks) are set."""
        return draws_hooked(self.records.config)

    def save_set(self, syn: SyntheticSet, training: dict, extra: dict) -> Path:
        """Write `syn` with its manifest to the run's out_dir (training: how its students train,
        Method.manifest_fields; extra: what this save adds)."""
        return self.records.save(syn, self.train, self.out_dir, training, extra)

    def phase_records(self, i: int, pairs_budget: int) -> SetRecords:
        """What phase i distils (phased methods): this run with the phase's budget and seed."""
        return self.records.changed(budget=pairs_budget, seed=phase_seed(self.seed, i))

    def for_phase(self, i: int, pairs_budget: int, out_dir: Path, resume: str, last: bool) -> "MethodContext":
        """Phase i's context: its budget and seed, its own output directory and resume setting, its draws in
        <draws dir>/phase_<i>, and (not the last phase) its initial set from <init_from>/phase_<i>."""
        records = self.phase_records(i, pairs_budget)
        changes: dict = {"resume": resume}
        draws = records.config.get("draws")
        if draws and any(draws.get(hook) for hook in ("record", "replay")):
            changes["draws"] = {**to_plain(draws), **{hook: str(Path(draws[hook]) / f"phase_{i}")
                                                      for hook in ("record", "replay") if draws.get(hook)}}
        if self.init_from is not None and not last:
            changes["init_from"] = str(self.init_from / f"phase_{i}")
        return MethodContext.of(records.changed(**changes).config, self.train, out_dir, self.loggers)
