import pytest
import torch

from mmdd import commands
from mmdd.plan import LiveBytes


def test_live_bytes_follows_storages_until_their_last_reference_dies():
    with LiveBytes() as m:
        a = torch.zeros(1000, device="meta")  # 4000 B
        b = a * 2
        view = b[:10]  # same storage: counted once
        del a
        c = b + 1
        del b, c
        d = torch.zeros(500, device="meta")  # 2000 B: b's storage is still alive through `view`
    assert m.peak == 8000
    assert m.current == 4000 + 2000
    del view, d


def test_live_bytes_sees_what_autograd_keeps_for_backward():
    x = torch.zeros(256, 1024, device="meta", requires_grad=True)  # 1 MiB, made outside: not counted
    with LiveBytes() as m:
        y = torch.exp(x)  # exp saves its output for backward: 1 MiB
        loss = y.sum()
        del y  # still alive: the graph holds it
        peak_forward = m.current
        loss.backward()  # x.grad: 1 MiB
    assert peak_forward >= 2**20
    assert m.current >= 2**20  # x.grad outlives the block


def test_plan_prints_counts_store_size_and_estimates(capsys):
    base = ["budget=20", "teacher.num_experts=3", "teacher.epochs=2"]
    assert commands.plan(["distill", *base, "method.syn_steps=2"]) == 0
    two = capsys.readouterr().out
    assert commands.plan(["distill", *base, "method.syn_steps=6"]) == 0
    six = capsys.readouterr().out
    assert "trajectory store: 3 experts x 3 snapshots" in two

    def mb(text, stage):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(stage))
        return float(line.split(":")[1].split("MB")[0].replace(",", ""))

    # the full unroll keeps every step's graph; TESLA one step's at a time
    assert mb(six, "distill, full unroll") > 2 * mb(two, "distill, full unroll")
    assert abs(mb(six, "distill, TESLA") - mb(two, "distill, TESLA")) <= 1
    assert commands.plan(["distill", "method.syn_steps=abc"]) == 2


def test_plan_of_a_frozen_backbone_method(capsys):
    """RepBlend: cached backbone features of the touched images only (the batches are drawn on the CPU)."""
    assert commands.plan(["distill", "method=repblend", "model=convnet_heads", "budget=50", "method.batch_syn=10",
                          "method.syn_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "distill, TESLA (2 steps of batch 10)" in out and "image head 526,336" in out


def test_plan_of_distribution_matching_grows_with_its_batches(capsys):
    def mb(args):
        assert commands.plan(["distill", "method=mdm", "budget=100", *args]) == 0
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("distill, mdm"))
        return float(line.split(":")[1].split("MB")[0].replace(",", ""))

    small, more_real, all_syn = mb([]), mb(["method.real_batch=1024"]), mb(["method.syn_batch=null", "budget=500"])
    assert more_real > 3 * small and all_syn > 3 * small  # real batches are embedded, the synthetic one backpropagated


def test_plan_says_when_it_has_no_estimate_for_a_learned_method(capsys, monkeypatch):
    """A new learned method whose class names no distillation kind gets a line saying so, not silence."""
    from mmdd.methods.distribution.objective import DistributionMatching

    monkeypatch.setattr(DistributionMatching, "distillation_kind", None)
    assert commands.plan(["distill", "method=dm", "budget=20"]) == 0
    out = capsys.readouterr().out
    assert "distill: no estimate for method=dm (DistributionMatching sets no distillation_kind" in out
    assert not any(ln.strip().startswith("distill, dm") for ln in out.splitlines())


def test_a_gpu_distillation_that_cannot_fit_stops_before_training_naming_departures_that_fit():
    """The MTT-VL paper cell (full unroll over all 100 pairs at 224 px) needs ~243 GB; here the same check on a tiny
    cell against a GPU of a few MB."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from mmdd.errors import MmddError
    from mmdd.paths import conf_dir
    from mmdd.plan import check_distill_fits, distill_estimate, meta_model

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("distill", overrides=["method=mtt_vl", "budget=40", "method.batch_syn=null",
                                            "method.syn_steps=4", "model.image.width=16"])
    method = instantiate(cfg.method)
    need = distill_estimate(cfg, meta_model(cfg, 384), 384, method).total
    check_distill_fits(cfg, method, 384, available=int(need / 0.8))  # fits
    with pytest.raises(MmddError, match=r"mtt_vl at budget 40, 32 px \(full meta-gradient, 4 inner steps of batch 40\) "
                                        r"needs about .* Choose a departure .*method.meta_gradient=tesla.*"
                                        r"method.batch_syn=20 .*: about .*hardware.memory_check=false"):
        check_distill_fits(cfg, method, 384, available=int(need / 0.9))
    cfg.hardware.memory_check = False
    check_distill_fits(cfg, method, 384, available=1)
