"""`mmdd bench` on tiny data: both paths run, their gradients agree, the report is written."""

import json

import pytest

from conftest import TINY, run_in_process


@pytest.fixture(scope="module")
def heads_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    common = [*TINY, "logger=none", "pretrain.epochs=2", "pretrain.batch_size=16"]
    run_in_process(["pretrain", *common, "hydra.run.dir=outputs/pretrain"], root, check=True)
    run_in_process(["buffer", *common, "model=convnet_heads", "hydra.run.dir=outputs/buffer_heads"], root, check=True)
    run_in_process(["buffer", *common, "hydra.run.dir=outputs/buffer"], root, check=True)
    return root, common


@pytest.mark.parametrize("method,model", [("repblend", "convnet_heads"), ("tesla_vl", "convnet_minilm"),
                                          ("mtt_vl", "convnet_minilm"), ("lors", "convnet_minilm")])
def test_bench_paths_agree(heads_root, method, model):
    root, common = heads_root
    out = f"outputs/bench_{method}"
    proc = run_in_process(["bench", *common, f"model={model}", f"method={method}", "bench.iterations=2",
                           "bench.warmup=1", f"hydra.run.dir={out}"], root, check=True)
    assert "| s/iter reference | s/iter mmdd |" in proc.stdout
    res = json.loads((root / out / "bench.json").read_text())
    assert res["grad_max_rel_diff"] < 1e-4  # the same gradients, up to float32 rounding
    assert set(res["grad_rel_diff"]) >= {"images", "texts", "lr_image", "lr_text"}
    assert res["sec_per_iter"]["ours"] > 0 and res["sec_per_iter"]["reference"] > 0
    assert len(res["seconds"]["ours"]) == 2
    assert res["cached_backbone_features"] is (method == "repblend")
    assert (root / out / "bench.md").read_text().startswith("| method |")
    # the floor: FLOPs per iteration, the rate achieved and the machine's matmul peak
    assert res["flops_per_iter"]["ours"] > 0 and res["flops_per_iter"]["reference"] > 0
    assert res["achieved_flops"]["ours"] == pytest.approx(res["flops_per_iter"]["ours"] / res["sec_per_iter"]["ours"])
    assert res["matmul_peak_flops"] > 0 and "of peak" in proc.stdout and "GFLOP/iter" in proc.stdout
    # where the time goes: mmdd's path marks its parts; the heads and the flat-vector arithmetic always run
    ours = res["time_parts"]["ours"]
    # (the backbone too: RepBlend's frozen one once per iteration, the others' at every inner step)
    assert ours["heads"] > 0 and ours["flat"] > 0 and ours["data"] > 0 and ours["backbone"] > 0
    assert "Where the time goes" in proc.stdout and "mmdd: " in proc.stdout


def test_flops_are_counted_from_the_matrix_products_forward_and_backward():
    import torch

    from mmdd.bench.flops import iteration_flops, matmul_peak

    a = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(5, 6)
    assert iteration_flops(lambda: a @ b) == 2 * 4 * 5 * 6
    assert iteration_flops(lambda: (a @ b).sum().backward()) == 2 * (2 * 4 * 5 * 6)  # + the gradient to a
    assert 0 < matmul_peak(torch.device("cpu"), size=256, repeats=2) < float("inf")


def test_op_costs_count_each_operations_operands_and_result():
    """Bytes by hand: a product reads its operands and writes its result; an in-place add reads both and writes the
    first; views move nothing; a broadcast (stride-0) operand counts once. FLOPs as PyTorch's counter, through a
    double backward too."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmdd.bench.flops import OpCosts, floor, iteration_costs, memory_bandwidth

    a, b, x = torch.randn(4, 5), torch.randn(5, 6), torch.randn(6)
    assert iteration_costs(lambda: a @ b).ops == {(2 * 4 * 5 * 6, 4 * (20 + 30 + 24)): 1}
    c = torch.zeros(4, 6)
    assert iteration_costs(lambda: c.add_(a @ b)).bytes == 4 * (20 + 30 + 24) + 4 * (24 + 24 + 24)
    assert iteration_costs(lambda: (a.t(), a.view(20), a[1:])).bytes == 0
    assert iteration_costs(lambda: c.add_(x.expand(4, 6))).bytes == 4 * (24 + 6 + 24)

    w = torch.randn(6, 6, requires_grad=True)

    def double_backward():
        g = torch.autograd.grad(torch.tanh(a @ b @ w).sum(), w, create_graph=True)[0]
        (g * g).sum().backward()

    with FlopCounterMode(display=False) as counter:
        double_backward()
    costs = iteration_costs(double_backward)
    assert costs.flops == counter.get_total_flops() > 0
    assert costs.bytes > 0 and isinstance(costs, OpCosts)

    # floor: each operation at the faster ceiling it is bound by; here op 1 is compute-bound, op 2 traffic-bound
    ops = [[100, 10, 2], [10, 100, 1]]
    assert floor(ops, peak_flops=10.0, bandwidth=20.0) == {"roofline": 2 * 10.0 + 5.0, "compute": 21.0,
                                                          "traffic": 6.0}
    assert 0 < memory_bandwidth(torch.device("cpu"), megabytes=8, repeats=2) < float("inf")


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("name", ["full", "tesla"])
def test_the_independent_reference_port_gives_mmdds_gradients(name, merged):
    """float64, frozen backbone + heads with blending and a learned S: the bench's reference (written from the
    reference code, sharing none of mmdd's matching/meta-gradient code) and mmdd's strategies agree to 1e-9."""
    from dataclasses import replace

    import torch

    from conftest import toy_segment
    from mmdd.bench.reference import REFERENCE
    from mmdd.methods.trajectory.unrolling import Blend
    from mmdd.methods.trajectory.meta_gradient import meta_gradient
    from mmdd.models.convnet import ConvNet
    from mmdd.models.dual_encoder import DualEncoder
    from mmdd.models.losses import weighted_bce
    from mmdd.synthetic.similarity import LowRankSimilarity

    def seg():
        torch.manual_seed(0)
        bb = ConvNet(image_size=8, width=3, depth=1)
        model = DualEncoder(bb, bb.num_features, text_dim=5, embed_dim=6, image_head=True, trainable="heads").double()
        sim = LowRankSimilarity(4, rank=2, alpha=1.0, generator=torch.Generator().manual_seed(2)).double()
        with torch.no_grad():
            sim.right.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        s = toy_segment(model, 3, lambda logits, idx: weighted_bce(logits, sim.matrix(idx).clamp(0, 1)),
                        extra=tuple(sim.parameters()), blend=Blend(1.0, torch.Generator().manual_seed(4)))
        return replace(s, merged=merged)

    grads = []
    for strategy in (REFERENCE[name], meta_gradient(name)):
        s = seg()
        strategy(s, lambda t, inputs: t.backward(inputs=inputs))
        grads.append([s.images.grad, s.texts.grad, *(lr.grad for lr in s.lrs.values()), *(p.grad for p in s.extra)])
    for ref, ours in zip(*grads):
        assert torch.allclose(ref, ours, rtol=1e-9, atol=1e-12)
    assert grads[0][0].abs().sum() > 0
