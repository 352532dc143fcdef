"""Typed schemas of the config groups whose keys every file of the group shares (Hydra structured configs).

Each YAML file of these groups lists its schema first in its defaults, so Hydra checks at composition time,
before anything runs, that no key is misspelt or missing and that every value has the right type, e.g.
`mmdd distill protocol.epochs=abc` stops with "Value 'abc' of type 'str' could not be converted to Integer".
Methods are validated by their own settings dataclasses (`mmdd.methods.engine.outer_loop.OuterSettings` and its subclasses,
through `check_fields`) when they are built, since learned methods and coresets differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class HardwareConfig:
    """The types of conf/hardware/*.yaml (their values, and what each means: conf/hardware/_base.yaml)."""

    accelerator: str = MISSING  # cpu | gpu | auto
    devices: Any = MISSING  # an int, a list of device ids, or "auto"
    num_nodes: int = MISSING
    strategy: str = MISSING  # auto | ddp
    precision: str = MISSING  # 32-true | bf16-mixed | 16-mixed | 64-true
    num_threads: Optional[int] = MISSING
    deterministic: bool = MISSING
    tf32: bool = MISSING
    memory_check: bool = MISSING
    snapshot_cache_mb: Any = MISSING  # MB, or auto
    inference_batch: int = MISSING
    channels_last: bool = MISSING
    compile: bool = MISSING
    cpu_heap: str = MISSING  # keep | os (mmdd.utils.cpu_heap)


@dataclass
class ProtocolConfig:
    name: str = MISSING
    num_seeds: int = MISSING
    epochs: int = MISSING
    lr_decay_epoch: int = MISSING
    lr_decay: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    batch_size: int = MISSING
    lr_source: str = MISSING  # learned | learned_image (the image step size for both towers: MTT-VL) | fixed
    lr: float = MISSING
    eval_every: int = MISSING
    # every: after epochs k, 2k, ... (1-based) and the last; reference: after the first epoch, then every k (0-based
    # 0, k, 2k, ...) and the last, as LoRS's and RepBlend's evaluate_synset
    eval_schedule: str = MISSING
    # permutation: one shuffled pass per epoch; independent_if_similarity: a set with a learned S draws each of an
    # epoch's ceil(N/B) batches independently (LoRS/RepBlend SimilarityDataloader), other sets a permutation
    batch_draw: str = MISSING
    selection: str = MISSING  # val | test_best | last
    loss: str = MISSING  # set | infonce | wbce | bce | soft_ce | kl | mse
    label_temperature: float = MISSING
    trainable: Optional[str] = MISSING  # null | heads | text (the image tower frozen: PDS's students)
    cache_features: bool = MISSING
    # a phased set's (PTM-ST) student: separate (each phase its own step sizes, optimizer, schedule) | continued
    # (PTM-ST's code: the last phase's step sizes, one optimizer and schedule over all phases)
    phases: str = MISSING


@dataclass
class TeacherConfig:
    num_experts: int = MISSING
    epochs: int = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    batch_size: int = MISSING
    augment: bool = MISSING
    seed: int = 0
    # per_expert: each expert draws its own initialisation (MTT/LoRS's buffer.py); shared: every expert starts from
    # one (expert 0's), as fine-tunings of one pre-trained model do, which weight-space merging (MDM) assumes
    init: str = "per_expert"


@dataclass
class DataSettings:
    image_size: int = MISSING  # the one key every data config shares that code computes with


@dataclass
class PretrainSettings:
    epochs: int = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    batch_size: int = MISSING
    seed: int = MISSING


@dataclass
class PathSettings:
    min_free_mb: float = MISSING


@dataclass
class StageSettings:
    """The settings outside the typed groups (conf/base.yaml, conf/<stage>.yaml, and the keys code computes with in
    the untyped data group), with a type. A stage has only some of them; `check_stage_settings` checks those it
    has, before any data is loaded, so code reads them as they are (no int()/float() at every use). Types only: the
    values live in the YAML files."""

    seed: int = MISSING
    save_every: int = MISSING
    max_nonfinite: int = MISSING
    log_every_n_steps: int = MISSING
    log_pairs: int = MISSING
    diagnostics_every: int = MISSING
    claim_stale_minutes: float = MISSING
    progress_bar: bool = MISSING
    allow_other_dataset: bool = MISSING
    evaluate: bool = MISSING
    data: DataSettings = field(default_factory=DataSettings)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    paths: PathSettings = field(default_factory=PathSettings)


_KINDS = {int: ("a whole number", "int"), float: ("a number", "float"), bool: ("true or false", "bool")}


def typed_settings(schema=StageSettings, prefix: str = "") -> dict[str, type]:
    """{dotted key: type} of every leaf of a settings dataclass."""
    import dataclasses
    import typing

    out = {}
    for f in dataclasses.fields(schema):
        kind = typing.get_type_hints(schema)[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(typed_settings(kind, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = kind
    return out


def as_kind(value, kind: type):
    """`value` as a value of `kind` (int, float, str, bool, dict or list), or None when it is not one: a whole float is an
    int (3.0 -> 3), an int is a float, a finite number only; bools are never numbers. The one rule every settings
    check here uses."""
    import math
    from collections.abc import Mapping, Sequence

    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return int(value) if number and math.isfinite(value) and float(value).is_integer() else None
    if kind is float:
        return float(value) if number and math.isfinite(value) else None
    ok = {str: isinstance(value, str), bool: isinstance(value, bool), dict: isinstance(value, Mapping),
          list: isinstance(value, Sequence) and not isinstance(value, str)}[kind]
    return value if ok else None


def whole_budget(budget) -> int:
    """`budget` as an int when it is a whole number of pairs (8 or 8.0); an MmddError otherwise."""
    from mmdd.errors import MmddError

    pairs = as_kind(budget, int)
    if pairs is None:
        raise MmddError(f"budget={budget!r} is not a whole number of pairs; set budget=<positive integer> "
                        "(the number of image-text pairs of the synthetic set)")
    return pairs


def check_stage_settings(cfg) -> None:
    """Each setting of `cfg` that StageSettings names must have its type: `seed=abc` fails in a second, naming the
    key, not after the data has loaded. Whole numbers written as floats (`seed=3.0`, `budget=8.0`) are stored as ints,
    so code reads every setting as it is."""
    from omegaconf import OmegaConf

    from mmdd.errors import MmddError

    absent = object()
    for key, kind in typed_settings().items():
        value = OmegaConf.select(cfg, key, default=absent)
        if value is absent:
            continue
        converted = as_kind(value, kind)
        if converted is None:
            what, name = _KINDS[kind]
            raise MmddError(f"{key}={value!r} must be {what}; set {key}=<{name}>")
        if kind is int and not isinstance(value, int):
            OmegaConf.update(cfg, key, converted)
    if "budget" in cfg:  # a whole number of pairs
        cfg.budget = whole_budget(cfg.budget)


_WHAT = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
         dict: "a mapping of settings", list: "a list"}
_NO_VALUE = object()


def checked_value(value, hint):
    """`value` as a value of the annotation `hint`, or _NO_VALUE when it is not one. Understood: int, float, str, bool,
    dict, list, `X | None`, `list[X]`, `dict[str, X]` and `Literal[...]` (as_kind's rules for the plain kinds)."""
    import types
    import typing
    from collections.abc import Mapping, Sequence

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            converted = checked_value(value, arg)
            if converted is not _NO_VALUE:
                return converted
        return _NO_VALUE
    if origin is typing.Literal:
        return value if any(type(value) is type(a) and value == a for a in args) else _NO_VALUE  # True is not 1
    if origin is list:
        if not isinstance(value, Sequence) or isinstance(value, str):
            return _NO_VALUE
        items = [checked_value(v, args[0]) if args else v for v in value]
        return _NO_VALUE if any(v is _NO_VALUE for v in items) else items
    if origin is dict:
        if not isinstance(value, Mapping):
            return _NO_VALUE
        items = {k: checked_value(v, args[1]) if args else v for k, v in value.items()}
        return _NO_VALUE if any(v is _NO_VALUE for v in items.values()) else items
    if hint is Any:
        return value
    converted = as_kind(value, hint)
    return _NO_VALUE if converted is None else converted


def describe_hint(hint) -> str:
    """What a value of `hint` is, for a sentence: 'an integer or null', 'one of ('full', 'tesla')', ..."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [describe_hint(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return f"one of {args}"
    if origin is list:
        return f"a list of {describe_hint(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is dict:
        return f"a mapping of {describe_hint(args[1]).removeprefix('an ').removeprefix('a ')}s" if args else _WHAT[dict]
    return _WHAT.get(hint, str(hint))


def check_fields(settings, section: str, where: str) -> None:
    """Check (and normalise) every field of a settings dataclass against its annotation, in place: values from YAML
    or a command-line override are not typed by Hydra for groups without a schema. A value of the wrong kind is an
    MmddError naming `section.<field>`, what it must be, and `where` to fix it (checked_value's annotations)."""
    import dataclasses
    import typing

    from mmdd.errors import MmddError

    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        converted = checked_value(value, hints[f.name])
        if converted is _NO_VALUE:
            raise MmddError(f"{section}.{f.name} must be {describe_hint(hints[f.name])}, got {value!r} "
                            f"({type(value).__name__}); {where} ({section}.{f.name}=...)")
        setattr(settings, f.name, converted)


def build_settings(cls, values, section: str, where: str):
    """`cls(**values)` for a settings dataclass whose values come from a config: a key it does not have is a sentence
    naming the close matches, a key it needs and the config lacks names the config (every setting a method reads is
    in its YAML, the one source of its defaults)."""
    import dataclasses
    import difflib

    from mmdd.errors import MmddError

    values = dict(values or {})
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        said = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=3)
            said.append(f"{section}.{key}" + (f" (did you mean {' or '.join(f'{section}.{c}' for c in close)}?)"
                                              if close else ""))
        raise MmddError(f"{', '.join(said)}: not a setting here ({where}); the settings are: {', '.join(names)}")
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in values]
    if missing:
        raise MmddError(f"{where} does not set {', '.join(f'{section}.{m}' for m in missing)}: a config names every "
                        "setting its method reads (the YAML is where their defaults live); add them")
    return cls(**values)


SCHEMAS = {"hardware": HardwareConfig, "protocol": ProtocolConfig, "teacher": TeacherConfig}
_registered = False


def register_schemas() -> None:
    """Store each schema as `<group>/_schema` (idempotent); conf/<group>/*.yaml start from it."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, node in SCHEMAS.items():
        cs.store(group=group, name="_schema", node=node)
    _registered = True
