"""The interface every method implements, and what they share: init and saving of the set."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmdd.data.annotations import Split
from mmdd.data.splits import SplitData
from mmdd.data.transforms import normalize, per_image_augment, random_resized_crop
from mmdd.config_schema import whole_budget
from mmdd.errors import MmddError
from mmdd.models.losses import DEFAULT_INNER_LOSS, DEFAULT_LABEL_TEMPERATURE
from mmdd.synthetic.synthetic_set import SyntheticSet, nearest_captions, save_grid
from mmdd.utils.config import config_hash
from mmdd.identity import data_identity, model_identity

log = logging.getLogger(__name__)


@dataclass
class DistillResult:
    """What a method made: the set, and what its run reports (saved beside the set by the distill stage)."""

    synthetic: SyntheticSet
    history: list[dict] = field(default_factory=list)  # one row per outer iteration (learned methods)
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)  # modality collapse: real/initial/final
    resumes: list[dict] = field(default_factory=list)  # from which iterations, with which outer settings changed
    # The fingerprint of the frozen backbone the set was made on (mmdd.models.dual_encoder), when there is one:
    # saved with the set, so students on another frozen backbone are refused.
    backbone_fingerprint: str | None = None
    # The experts of the trajectory store at cfg.buffer_dir the method read (their training is part of its cost).
    teacher_experts: list[int] = field(default_factory=list)
    # Distillation time spent by earlier processes of this run (before a resume, or complete phases skipped).
    earlier_seconds: float = 0.0
    # Sets its students train on first, in order (PTM-ST's earlier phases; saved beside the set by the method).
    earlier_phases: list[SyntheticSet] = field(default_factory=list)


class Method:
    """A method turns the real training split into a SyntheticSet of `budget` pairs.

    Subclasses implement `synthesize`; the `distill` stage instantiates them from `cfg.method`
    (`_target_`), calls `synthesize` and saves the result.
    """

    name: str = "method"
    takes_draws = False  # whether draws.record / draws.replay (mmdd.methods.trajectory.draws) apply to its random draws
    # The shape of its distillation, for the tools that model one: `mmdd plan`'s memory estimate (and the GPU memory
    # check before a run), `mmdd bench`'s reference loop. "trajectory" | "distribution" | None: none known, which
    # `mmdd plan` says for a learned method rather than leaving it out silently.
    distillation_kind: str | None = None

    def synthesize(self, cfg, data: dict[str, SplitData], out_dir: Path, loggers: list) -> DistillResult:
        raise NotImplementedError

    def manifest_fields(self) -> dict:
        """How students of this method's sets train (saved in the set's manifest, read by `mmdd evaluate`)."""
        return {"inner_loss": DEFAULT_INNER_LOSS, "label_temperature": DEFAULT_LABEL_TEMPERATURE}


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


def real_pairs(train: SplitData, img_idx: list[int], generator: torch.Generator, mean, std):
    """The given training images (normalised), each with one of its captions drawn from `generator`."""
    img2txt = train.split.img2txt()
    cap_idx = [img2txt[i][int(torch.randint(len(img2txt[i]), (1,), generator=generator))] for i in img_idx]
    return normalize(train.image_batch(img_idx), mean, std), train.text_emb[cap_idx].clone()


def sample_real_pairs(train: SplitData, n: int, generator: torch.Generator, mean, std):
    """`n` distinct random training images, each with one random caption of its own."""
    img_idx = torch.randperm(train.num_images, generator=generator)[:n].tolist()
    return real_pairs(train, img_idx, generator, mean, std)


def reference_pairs(train: SplitData, n: int, generator: torch.Generator, mean, std, augment):
    """`init: reference`, the initial pairs as the reference scripts draw them (LoRS and PTM-ST
    src/vl_distill_utils.py get_images_texts, RepBlend's get_random_images_texts, MTT-VL distill.py:65-84): `n` random
    caption entries of the train split (the first n of a permutation of all captions, so an image can come twice),
    each image through the teachers' training transform (`augment`, an AugmentConfig of data.augment), with its
    caption's embedding."""
    cap_idx = torch.randperm(len(train.split.captions), generator=generator)[:n]
    img_idx = train.txt2img[cap_idx].tolist()
    per_image = per_image_augment(augment, train)
    if per_image is not None:  # data.augment.style=blip: crop, flip, RandAugment per image (uint8)
        images = normalize(torch.stack([per_image(train, i, generator) for i in img_idx]), mean, std)
    else:
        images = normalize(train.image_batch(img_idx), mean, std)
        if augment.enabled:  # data.augment.style=mmdd: the teachers' batch crop on normalised images
            images = random_resized_crop(images, augment, generator)
    return images, train.text_emb[cap_idx].clone()


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


def save_synthetic(cfg, syn: SyntheticSet, train: SplitData, out_dir: Path, training: dict,
                   extra: dict | None = None) -> Path:
    """Write the set with its manifest, the nearest real caption per text and an image grid. `training`: how its
    students train (Method.manifest_fields)."""
    out_dir = Path(out_dir)
    captions = nearest_captions(syn.texts, train.text_emb, train.split.captions)
    manifest = {
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
        **(extra or {}),
    }
    r = manifest["value_range"]
    if r["out_of_range"]:
        log.warning("the synthetic set in %s has values up to %.3g (images) / %.3g (texts) standard deviations of the "
                    "real data's, beyond %g: it no longer looks like data (an outer learning rate too high?); "
                    "recorded in its manifest (value_range)", out_dir, r["images_max_std"], r["texts_max_std"],
                    SANE_RANGE)
    syn.save(out_dir, manifest, captions)
    save_grid(syn.images, cfg.data.mean, cfg.data.std, out_dir / "grid.png")
    return out_dir
