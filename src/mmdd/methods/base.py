"""The interface every method implements (a Method turns a MethodContext into a DistillResult), and the real pairs
methods start from."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from mmdd.data.splits import SplitData
from mmdd.data.transforms import per_image_augment, random_resized_crop
from mmdd.methods.context import MethodContext
from mmdd.models.losses import DEFAULT_INNER_LOSS, DEFAULT_LABEL_TEMPERATURE
from mmdd.synthetic.synthetic_set import SyntheticSet

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
    (`_target_`), calls `synthesize` with the run's MethodContext (mmdd.methods.context) and saves the result.
    """

    name: str = "method"
    # Whether the set is learned step by step (LearnedMethod): such a run resumes from its checkpoint, and `mmdd plan`
    # says when it has no estimate for one. A learning-free selection instead reuses its complete set on a rerun.
    learned = False
    takes_draws = False  # whether draws.record / draws.replay (mmdd.methods.trajectory.draws) apply to its random draws
    # The shape of its distillation, for the tools that model one: `mmdd plan`'s memory estimate (and the GPU memory
    # check before a run), `mmdd bench`'s reference loop. "trajectory" | "distribution" | None: none known, which
    # `mmdd plan` says for a learned method rather than leaving it out silently.
    distillation_kind: str | None = None

    def synthesize(self, context: MethodContext) -> DistillResult:
        raise NotImplementedError

    def manifest_fields(self) -> dict:
        """How students of this method's sets train (saved in the set's manifest, read by `mmdd evaluate`)."""
        return {"inner_loss": DEFAULT_INNER_LOSS, "label_temperature": DEFAULT_LABEL_TEMPERATURE}

    def computed_with(self) -> dict:
        """How the set's gradients were computed, where a method offers equivalent ways (saved in the manifest as
        `computed_with`; e.g. TESLA's second pass in forward mode or by double backward)."""
        return {}

    def variant(self) -> dict:
        """Which variant of the method made the set, where its settings change what the method is (saved in the
        manifest as `variant`, so a table says which variant each row is; e.g. DM with or without DSA)."""
        return {}


def real_pairs(train: SplitData, img_idx: list[int], generator: torch.Generator):
    """The given training images (normalised), each with one of its captions drawn from `generator`."""
    img2txt = train.split.img2txt()
    cap_idx = [img2txt[i][int(torch.randint(len(img2txt[i]), (1,), generator=generator))] for i in img_idx]
    return train.normalised(img_idx), train.text_emb[cap_idx].clone()


def sample_real_pairs(train: SplitData, n: int, generator: torch.Generator):
    """`n` distinct random training images, each with one random caption of its own."""
    img_idx = torch.randperm(train.num_images, generator=generator)[:n].tolist()
    return real_pairs(train, img_idx, generator)


def reference_pairs(train: SplitData, n: int, generator: torch.Generator, augment):
    """`init: reference`, the initial pairs as the reference scripts draw them (LoRS and PTM-ST
    src/vl_distill_utils.py get_images_texts, RepBlend's get_random_images_texts, MTT-VL distill.py:65-84): `n` random
    caption entries of the train split (the first n of a permutation of all captions, so an image can come twice),
    each image through the teachers' training transform (`augment`, an AugmentConfig of data.augment), with its
    caption's embedding."""
    cap_idx = torch.randperm(len(train.split.captions), generator=generator)[:n]
    img_idx = train.txt2img[cap_idx].tolist()
    per_image = per_image_augment(augment, train)
    if per_image is not None:  # data.augment.style=blip: crop, flip, RandAugment per image (uint8)
        images = train.normalise(torch.stack([per_image(train, i, generator) for i in img_idx]))
    else:
        images = train.normalised(img_idx)
        if augment.enabled:  # data.augment.style=mmdd: the teachers' batch crop on normalised images
            images = random_resized_crop(images, augment, generator)
    return images, train.text_emb[cap_idx].clone()
