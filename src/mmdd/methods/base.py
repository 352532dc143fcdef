"""The interface every method implements, and what they share: init and saving of the set."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mmdd.data.annotations import Split
from mmdd.data.datamodule import SplitData
from mmdd.data.transforms import normalize
from mmdd.errors import MmddError
from mmdd.synthetic.synthetic_set import SyntheticSet, nearest_captions, save_grid
from mmdd.utils.config import config_hash, data_identity, model_identity

log = logging.getLogger(__name__)


class Method:
    """A method turns the real training split into a SyntheticSet of `budget` pairs.

    Subclasses implement `synthesize`; the `distill` stage instantiates them from `cfg.method`
    (`_target_`), calls `synthesize` and saves the result.
    """

    name: str = "method"
    # The fingerprint of the frozen backbone the set was made on (mmdd.models.dual_encoder), when there is one:
    # saved with the set, so students on another frozen backbone are refused.
    backbone_fingerprint: str | None = None

    def synthesize(self, cfg, data: dict[str, SplitData], out_dir: Path, loggers: list) -> SyntheticSet:
        raise NotImplementedError


def check_budget(budget, train: SplitData | Split) -> int:
    """`budget` (the config value as given: pass `cfg.budget` itself, before any int()) as an int, checked to be
    a whole number of pairs within 1..train images."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or (
        isinstance(budget, float) and not budget.is_integer()
    ):
        raise MmddError(f"budget={budget!r} is not a whole number of pairs; set budget=<positive integer> "
                        "(the number of image-text pairs of the synthetic set)")
    budget = int(budget)
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


def save_synthetic(cfg, syn: SyntheticSet, train: SplitData, out_dir: Path, extra: dict | None = None) -> Path:
    """Write the set with its manifest, the nearest real caption per text and an image grid."""
    out_dir = Path(out_dir)
    captions = nearest_captions(syn.texts, train.text_emb, train.split.captions)
    manifest = {
        "method": str(cfg.method.name),
        "budget": int(cfg.budget),
        "seed": int(cfg.seed),
        "dataset": str(cfg.data.name),
        "text_encoder": str(cfg.model.text.name_or_path),
        "text_pooling": str(cfg.model.text.pooling),
        "image_size": int(cfg.data.image_size),
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "config_hash": config_hash(cfg),
        # what the set was distilled on: evaluate refuses other data unless asked (allow_other_dataset=true)
        "identity": {"data": data_identity(cfg.data), "model": model_identity(cfg.model)},
        "inner_loss": str(cfg.method.get("inner_loss", "infonce")),  # what students of this set train with
        "label_temperature": float(cfg.method.get("label_temperature", 0.1)),  # soft_ce/kl targets' sharpness
        **(extra or {}),
    }
    syn.save(out_dir, manifest, captions)
    save_grid(syn.images, cfg.data.mean, cfg.data.std, out_dir / "grid.png")
    return out_dir
