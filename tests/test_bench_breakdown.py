"""Where an iteration's time goes (mmdd.bench.breakdown): each profiled operation, forward and backward, is given
to the part of the iteration whose code made it."""

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mmdd.bench.breakdown import attribute, breakdown_cells, parts_of
from mmdd.utils.profiling import PARTS, scope

CPU = torch.device("cpu")


def _profiled(run):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return prof.events()


def _backward_parts(events) -> dict[str, set[str]]:
    """The parts given to each kind of backward node evaluation, by the node's name."""
    out: dict[str, set[str]] = {}
    for event, part in parts_of(events):
        if event.name.startswith("autograd::engine::evaluate_function: "):
            out.setdefault(event.name.split(": ", 1)[1], set()).add(part)
    return out


def test_backward_operations_belong_to_the_part_that_made_their_nodes():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 8, 8, requires_grad=True)
    conv, head = torch.randn(5, 3, 3, 3), torch.randn(7, 5)

    def iteration():
        with scope("backbone"):
            feats = F.conv2d(images, conv).mean((2, 3))
        with scope("heads"):
            logits = feats @ head.t()
        with scope("loss"):
            loss = logits.logsumexp(1).sum()
        loss.backward()  # outside every part: its node evaluations still belong to their forwards' parts

    parts = _backward_parts(_profiled(iteration))
    assert parts["ConvolutionBackward0"] == {"backbone"}
    assert parts["MeanBackward1"] == {"backbone"}
    assert parts["MmBackward0"] == {"heads"}
    assert parts["LogsumexpBackward0"] == {"loss"}


def test_double_backward_nodes_belong_to_the_part_of_the_first_backward():
    """TESLA's pass 2: an inner gradient taken with a graph, contracted (flat arithmetic), differentiated again. The
    nodes the first backward makes (the heads' gradient's graph) are the heads'; the contraction's are flat's."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    c = torch.randn(5, 4)

    def iteration():
        with scope("heads"):
            out = torch.tanh(x @ w)
        (g,) = torch.autograd.grad(out.pow(2).sum(), [w], create_graph=True)
        with scope("flat"):
            product = (c * g).sum()
        (dx,) = torch.autograd.grad(product, [x])
        return dx

    parts = _backward_parts(_profiled(iteration))
    assert parts["TanhBackward0"] == {"heads"}
    assert parts["MulBackward0"] >= {"flat"}  # c * g's node
    # the first backward's own ops made nodes (create_graph) that the second backward evaluates: still the heads'
    assert parts["TanhBackwardBackward0"] == {"heads"} and parts["TBackward0"] == {"heads"}
    # pow ran outside every part: its node, and the nodes its backward made, are nobody's
    assert parts["PowBackward0"] == {"other"} and parts["MulBackward1"] == {"other"}


def test_time_per_part_sums_the_self_times_and_reads_as_shares():
    torch.manual_seed(0)
    a = torch.randn(256, 256, requires_grad=True)

    def iteration():
        with scope("heads"):
            y = a @ a
        with scope("flat"):
            z = y.reshape(-1) * 2.0
        z.sum().backward()

    events = _profiled(iteration)
    totals = attribute(events, CPU)
    assert set(totals) == {*PARTS, "other"}
    assert abs(sum(totals.values()) - sum(e.self_cpu_time_total for e in events) / 1e6) < 1e-9
    assert totals["heads"] > 0 and totals["flat"] > 0
    assert totals["backbone"] == totals["data"] == 0.0
    cells = breakdown_cells({"heads": 3.0, "flat": 1.0, "backbone": 0.0}, seconds=2.0)
    assert cells == "heads 75% (1.50 s), flat 25% (0.50 s)"
