"""The encoder a distribution-matching method draws each iteration (mmdd.methods.distribution.encoders): an
expert snapshot or MDM's mixed teacher, merged by hand."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import method_values
from mmdd.errors import MmddError
from mmdd.methods.distribution.encoders import EncoderSampler, EncoderSettings, merge_weights, model_stock_ratio


def test_model_stock_merge_by_hand():
    w0, w1, w2 = torch.zeros(2), torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    c = math.cos(math.pi / 4)
    r = 2 * c / (1 + c)
    assert float(model_stock_ratio(w0, w1, w2)) == pytest.approx(r)
    merged = merge_weights({"w": w0 + 1}, [{"w": w1 + 1}, {"w": w2 + 1}], alpha=0.5)["w"]  # the anchor moves too
    assert merged.tolist() == pytest.approx((1 + 0.5 * r * torch.tensor([1.5, 0.5])).tolist())
    # opposed deltas: MDM's r = 2c/(1+c) diverges at c = -1; clamped, the merge stays at the anchor
    assert float(model_stock_ratio(w0, w1, -w1)) == 0.0
    assert float(model_stock_ratio(w0, w1, w1)) == pytest.approx(1.0)  # agreeing deltas: the average itself


class _Store:
    """Three 'experts' of a 2-parameter model; snapshot e of expert x is (x + e) * base (+ init for expert x)."""

    epochs, n_experts = 3, 3

    def __init__(self, shared_init: bool):
        self.shared_init = shared_init

    def snapshots(self, expert, epochs):
        base = {"image": torch.tensor([1.0, 2.0]), "text": torch.tensor([3.0])}
        init = 0.0 if self.shared_init else 10.0 * expert
        return [{m: (expert + 1) * e * b + init for m, b in base.items()} for e in epochs]


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(2))
        self.b = torch.nn.Parameter(torch.zeros(1))

    def modality_parameter_names(self):
        return {"image": ["a"], "text": ["b"]}


def encoder(**changes) -> EncoderSettings:
    """conf/method/mdm.yaml's encoder settings with `changes`."""
    from mmdd.config_schema import build_settings

    return build_settings(EncoderSettings, {**method_values("mdm")["encoder"], **changes}, "method.encoder", "test")


def test_encoder_sampler_loads_an_expert_snapshot_and_a_merged_teacher(caplog):
    model = _Tiny()
    store = _Store(shared_init=True)
    gen = torch.Generator().manual_seed(3)
    sampler = EncoderSampler(encoder(kind="expert", min_epoch=1), model, store)
    stats = sampler.draw(gen)
    want = store.snapshots(int(stats["distill/encoder_expert"]), [int(stats["distill/encoder_epoch"])])[0]
    assert torch.equal(model.a.detach(), want["image"]) and torch.equal(model.b.detach(), want["text"])
    assert 1 <= stats["distill/encoder_epoch"] <= 3

    mixed = EncoderSampler(encoder(kind="mixed", alpha=0.5), model, store)
    gen, replay = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    mixed.draw(gen)
    experts = torch.randperm(3, generator=replay)[:2].tolist()
    epochs = [1 + int(torch.randint(3, (1,), generator=replay)) for _ in range(2)]
    snaps = [store.snapshots(x, [0, e]) for x, e in zip(experts, epochs)]
    for m, name in (("image", "a"), ("text", "b")):
        w0, w1, w2 = snaps[0][0][m], snaps[0][1][m], snaps[1][1][m]
        want = merge_weights({name: w0}, [{name: w1}, {name: w2}], 0.5)[name]
        assert torch.allclose(model.get_parameter(name).detach(), want)
    assert "different initialisations" not in caplog.text
    EncoderSampler(encoder(kind="mixed"), model, _Store(shared_init=False)).draw(gen)
    assert "different initialisations" in caplog.text  # merging experts of different inits is said, not hidden
    with pytest.raises(MmddError, match="recorded epochs"):
        EncoderSampler(encoder(kind="expert", max_epoch=5), model, store)


def test_the_fresh_anchor_merges_around_a_model_built_anew_each_iteration():
    """encoder.anchor=fresh (MDM's code): w0 is a model built from a seed the run's generator draws after the experts
    and epochs, so two iterations merge around two different anchors."""
    model, store = _Tiny(), _Store(shared_init=True)
    built = []

    def build():  # what context.model.build does: a model initialised from the global generator
        fresh = _Tiny()
        with torch.no_grad():
            fresh.a.normal_()
            fresh.b.normal_()
        built.append(fresh)
        return fresh

    mixed = EncoderSampler(encoder(kind="mixed", alpha=0.5, anchor="fresh"), model, store, build)
    gen, replay = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    mixed.draw(gen)
    experts = torch.randperm(3, generator=replay)[:2].tolist()
    epochs = [1 + int(torch.randint(3, (1,), generator=replay)) for _ in range(2)]
    snaps = [store.snapshots(x, [e])[0] for x, e in zip(experts, epochs)]
    anchor = built[0]
    for m, name in (("image", "a"), ("text", "b")):
        want = merge_weights({name: anchor.get_parameter(name).detach()}, [{name: snaps[0][m]}, {name: snaps[1][m]}],
                             0.5)[name]
        assert torch.allclose(model.get_parameter(name).detach(), want)
    first = model.a.detach().clone()
    mixed.draw(gen)
    assert len(built) == 2 and not torch.equal(built[0].a, built[1].a) and not torch.equal(model.a.detach(), first)
