"""The outer loop every learned method shares, driven by objectives other than trajectory matching.

`MeanMatching` below is a whole new learned method: a settings dataclass, an objective and a `LearnedMethod`
subclass, with one config (written by the test as conf/method/mean_matching.yaml in its own config folder).
It runs through the real `mmdd distill`, with checkpoints, resume, history and saving from the shared loop."""

from __future__ import annotations

import json
from dataclasses import dataclass

import lightning as L
import pytest
import torch

from conftest import TINY
from helpers import outer_values
from mmdd.errors import MmddError
from mmdd.methods.engine.learned import LearnedMethod
from mmdd.methods.engine.outer_loop import (NonFiniteLoss, ObjectiveStep, OuterIterations, OuterLoopModule, OuterSettings,
                                     outer_optimizer)
from mmdd.synthetic.similarity import LowRankSimilarity
from mmdd.synthetic.synthetic_set import SyntheticSet


# ------------------------------------------------------------------ a new method: the whole of it
@dataclass(kw_only=True)
class MeanMatchingSettings(OuterSettings):
    noise: float  # std of Gaussian noise on the real means each iteration (draws from the run's generator)


class MeanMatchingObjective:
    """|mean(synthetic) - mean(real)|^2 per modality: the first moment of distribution matching, in input space."""

    model = None

    def __init__(self, images: torch.Tensor, texts: torch.Tensor, noise: float = 0.0):
        self.targets = {"image": images.mean(0), "text": texts.mean(0)}
        self.noise = noise

    def __call__(self, syn, generator, backward) -> ObjectiveStep:
        terms = {}
        for m, data in (("image", syn.images), ("text", syn.texts)):
            target = self.targets[m].to(data.device)
            target = target + self.noise * torch.randn(target.shape, generator=generator).to(data.device)
            terms[m] = (data.mean(0) - target).pow(2).sum()
        loss = sum(terms.values())
        backward(loss, list(syn.parameters()))
        return ObjectiveStep(loss.detach(), {m: t.detach() for m, t in terms.items()})


class MeanMatching(LearnedMethod):
    settings_cls = MeanMatchingSettings

    def make_objective(self, context, model, fingerprint):
        train = context.train
        images = train.normalised(range(train.num_images))
        return MeanMatchingObjective(images, train.text_emb, self.settings.noise)


# ------------------------------------------------------------------ the loop itself
SETTINGS = outer_values(lr_img=0.24, lr_txt=0.24, lr_lr=0.0, lr_init=0.01, momentum=0.5, iterations=20, noise=0.0)


def toy_set(n: int = 6, similarity=None) -> SyntheticSet:
    gen = torch.Generator().manual_seed(0)
    return SyntheticSet(torch.randn(n, 3, 4, 4, generator=gen), torch.randn(n, 5, generator=gen),
                        {"image": 0.01, "text": 0.02}, similarity)


def fit(loop: OuterLoopModule, steps: int) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(loop, OuterIterations(steps))
    return trainer


def test_outer_optimizer_groups_give_each_part_of_the_set_its_own_rate():
    syn = toy_set(similarity=LowRankSimilarity(6, 2, 1.0, torch.Generator().manual_seed(0)))
    settings = OuterSettings(**outer_values(lr_img=100.0, lr_txt=2.0, lr_lr=1e-3, lr_init=0.01, momentum=0.5,
                                            lr_sim=10.0, sim_momentum=0.9, iterations=1))
    groups = outer_optimizer(syn, settings).param_groups
    assert [g["params"] for g in groups[:2]] == [[syn.images], [syn.texts]]
    assert groups[2]["params"] == list(syn.lrs.parameters())
    assert groups[3]["params"] == list(syn.similarity.parameters())
    assert [g["lr"] for g in groups] == [100.0, 2.0, 1e-3, 10.0]
    assert [g["momentum"] for g in groups] == [0.5, 0.5, 0.5, 0.9]
    assert len(outer_optimizer(toy_set(), settings).param_groups) == 3  # no S, no group for it


def test_a_toy_objective_is_learned_by_the_outer_loop():
    syn = toy_set()
    target_images, target_texts = torch.full((1, 3, 4, 4), 2.0), torch.full((1, 5), -1.0)
    objective = MeanMatchingObjective(target_images, target_texts)
    loop = OuterLoopModule(objective, syn, MeanMatchingSettings(**SETTINGS), seed=0)
    before = float(objective(syn, None, lambda t, inputs: None).loss)
    fit(loop, 20)
    losses = [h["distill/matching_loss"] for h in loop.history]
    assert len(loop.history) == 20 and loop.resumes == [] and losses[0] == pytest.approx(before)
    assert losses[-1] < 1e-3 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))  # heavy ball with real roots at these rates: monotone
    assert syn.images.mean(0).sub(2.0).abs().max() < 0.05 and syn.texts.mean(0).add(1.0).abs().max() < 0.05
    assert set(loop.history[0]) >= {"iteration", "distill/loss_image", "distill/loss_text", "distill/lr_image"}


def test_an_objective_that_is_never_finite_stops_with_the_set_unchanged():
    class NaNObjective:
        model = None

        def __call__(self, syn, generator, backward):
            loss = syn.images.sum() * float("nan")
            backward(loss, [syn.images])
            return ObjectiveStep(loss.detach())

    syn = toy_set()
    before = syn.images.detach().clone()
    loop = OuterLoopModule(NaNObjective(), syn, MeanMatchingSettings(**SETTINGS), seed=0, max_nonfinite=3)
    with pytest.raises(NonFiniteLoss, match="3 iterations in a row"):
        fit(loop, 10)
    assert torch.equal(syn.images.detach(), before) and loop.skipped_iterations == 3


def test_settings_of_a_new_method_are_typed_from_its_dataclass():
    assert MeanMatchingSettings(**{**SETTINGS, "noise": 1, "iterations": 3.0}).iterations == 3
    with pytest.raises(MmddError, match=r"method.noise must be a finite number, got 'abc' \(str\)"):
        MeanMatchingSettings(**{**SETTINGS, "noise": "abc"})


# ------------------------------------------------------------------ the new method through `mmdd distill`
def test_a_new_method_is_one_module_and_one_config(tmp_path):
    """The config folder holds conf/method/mean_matching.yaml only; `mmdd distill method=mean_matching` finds it
    through hydra.searchpath, and the shared loop saves, checkpoints and resumes it."""
    from hydra import compose, initialize_config_dir

    from mmdd.stages.distill import run_distill
    from mmdd.paths import conf_dir

    extra = tmp_path / "conf" / "method"
    extra.mkdir(parents=True)
    (extra / "mean_matching.yaml").write_text(
        "defaults: [_outer, _self_]\n_target_: test_outer_loop.MeanMatching\nname: mean_matching\nlr_img: 0.5\n"
        "lr_txt: 0.5\nlr_lr: 0.0\nlr_init: 0.01\niterations: 4\nnoise: 0.1\n")
    tiny = [o for o in TINY if not o.startswith("method.")]

    def distill(iterations: int):
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("distill", overrides=[*tiny, "method=mean_matching", f"method.iterations={iterations}",
                                                f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "logger=none",
                                                "evaluate=false", "save_every=2", f"paths.root_dir={tmp_path}",
                                                f"paths.output_dir={tmp_path / 'run'}"])
        return run_distill(cfg)

    out = distill(4)
    manifest = json.loads((out / "manifest.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert manifest["method"] == "mean_matching" and manifest["complete"] and manifest["iteration"] == 4
    assert manifest["inner_loss"] == "infonce"  # students train as for any set that does not say otherwise
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["distill/matching_loss"] < history[0]["distill/matching_loss"]
    assert (out / "checkpoint" / "last.ckpt").is_file()
    out = distill(6)  # extended from its checkpoint, as every learned method is
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["iteration"] == 6 and [r["iteration"] for r in manifest["resumed"]] == [4]
