"""The parity hooks: a run's random draws recorded and replayed (draws.record / draws.replay, mmdd.methods.trajectory.draws), and
a run started from a given set (init_from)."""

import json

import pytest
import torch

from conftest import TINY, run_in_process
from mmdd.methods.trajectory.draws import RecordingDraws, ReplayedDraws
from mmdd.utils.draws import replayed_dropout
from mmdd.synthetic.similarity import LowRankSimilarity
from mmdd.synthetic.synthetic_set import SyntheticSet

QUIET = ["logger=none", "evaluate=false", "diagnostics_every=0", "save_every=0"]
# LoRS (TESLA, weighted BCE against S) with the heads' dropout on: every kind of draw but blends, and TESLA's two passes.
LORS = ["method=lors", "method.batch_syn=3", "method.iterations=3", "method.syn_steps=3", "model.dropout=0.1"]
PAIRS = 7  # budget 8: S takes one pair


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("draws")
    run_in_process(["buffer", *TINY, "model.dropout=0.1", "logger=none", "hydra.run.dir=outputs/buffer"], root,
                   check=True)
    g = torch.Generator().manual_seed(11)
    initial = SyntheticSet(torch.randn(PAIRS, 3, 32, 32, generator=g), torch.randn(PAIRS, 384, generator=g),
                           {"image": 0.01, "text": 0.01}, LowRankSimilarity(PAIRS, 10, 3.0, g))
    initial.save(root / "initial", {})
    return root


def distill(root, name, *overrides, check=True):
    proc = run_in_process(["distill", *TINY, *QUIET, *LORS, f"init_from={root / 'initial'}", *overrides,
                           f"hydra.run.dir=outputs/{name}"], root, check=check)
    return proc


def load(root, name):
    return SyntheticSet.load(root / "outputs" / name / "synthetic")[0].state_dict()


def test_replayed_draws_give_the_set_of_the_run_that_drew_them(root):
    distill(root, "recorded", "seed=0", f"draws.record={root / 'draws'}")
    doc = json.loads((root / "draws" / "draws.json").read_text())
    assert len(doc["iterations"]) == 3
    first = doc["iterations"][0]
    assert len(first["batches"]) == 3 and all(len(b) == 3 for b in first["batches"])
    assert first["dropout_calls"] == 6  # TESLA: three steps in each pass
    # Another seed draws other experts, batches and dropout masks; replaying the recorded ones gives the same set.
    distill(root, "replayed", "seed=1", f"draws.replay={root / 'draws'}")
    distill(root, "own_draws", "seed=1")
    recorded, replayed, own = load(root, "recorded"), load(root, "replayed"), load(root, "own_draws")
    initial = SyntheticSet.load(root / "initial")[0].state_dict()
    for k in recorded:
        assert torch.equal(recorded[k], replayed[k]), k  # bit for bit
    assert not torch.equal(recorded["images"], initial["images"])  # it learned
    assert not torch.equal(own["images"], recorded["images"])  # the seed's own draws differ: the replay mattered


def test_draws_that_do_not_fit_are_refused_with_the_iteration_named(root):
    if not (root / "draws" / "draws.json").exists():
        distill(root, "recorded", "seed=0", f"draws.record={root / 'draws'}")
    proc = distill(root, "more_steps", "method.syn_steps=4", f"draws.replay={root / 'draws'}", check=False)
    assert proc.returncode == 2
    assert "iteration 1 cannot be replayed" in proc.stderr and "syn_steps" in proc.stderr
    proc = distill(root, "too_long", "method.iterations=4", f"draws.replay={root / 'draws'}", check=False)
    assert proc.returncode == 2 and "holds 3 iterations" in proc.stderr
    proc = distill(root, "both", f"draws.replay={root / 'draws'}", f"draws.record={root / 'again'}", check=False)
    assert proc.returncode == 2 and "both set" in proc.stderr


def test_init_from_refuses_a_set_of_another_size(root, tmp_path):
    SyntheticSet(torch.zeros(3, 3, 32, 32), torch.zeros(3, 384), {"image": 0.1, "text": 0.1},
                 LowRankSimilarity(3, 10, 3.0)).save(tmp_path / "small", {})
    proc = run_in_process(["distill", *TINY, *QUIET, *LORS, f"init_from={tmp_path / 'small'}",
                           "hydra.run.dir=outputs/small"], root)
    assert proc.returncode == 2
    assert "3 pairs, this run distils 7" in proc.stderr


def test_blends_and_dropout_masks_replay_exactly(tmp_path):
    """Blend draws and dropout masks through the record/replay objects themselves (RepBlend's blends need a run on a
    frozen backbone; the end-to-end test above covers the rest)."""
    from mmdd.utils.draws import write_draws

    rec = RecordingDraws(tmp_path)
    rec.begin([4, 7])
    gen = torch.Generator().manual_seed(3)
    expert, start = rec.segment_start(gen, 2, 3, 0)
    blend = rec.blend(gen, 1.0)
    schedule = rec.schedule(gen, 6, 4)
    drawn = [(schedule.next(), blend.draw(4)) for _ in range(2)]
    head = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Dropout(0.3)).train()
    x = torch.randn(4, 5, requires_grad=True)
    with rec.dropout(head):
        out = head(x)
    out.sum().backward()
    grad = x.grad.clone()
    rec.end()
    rep = ReplayedDraws(tmp_path)
    rep.begin([4, 7])
    assert rep.segment_start(None, 2, 3, 0) == (expert, start)
    rblend, rschedule = rep.blend(None, 1.0), rep.schedule(None, 6, 4)
    for idx, (lam, perm) in drawn:
        assert torch.equal(rschedule.next(), idx)
        rlam, rperm = rblend.draw(4)
        assert float(rlam) == float(lam) and torch.equal(rperm, perm)
    x.grad = None
    torch.manual_seed(1234)  # other RNG state: the masks must come from the file
    with rep.dropout(head):
        again = head(x)
    again.sum().backward()
    assert torch.equal(again, out) and torch.equal(x.grad, grad)
    rep.end()
    # Outside the context the module drops out with torch's RNG again.
    assert "forward" not in head[1].__dict__
    # The replayed dropout is torch's own arithmetic for a given mask.
    torch.manual_seed(0)
    y = torch.randn(50, 7)
    torch.manual_seed(5)
    dropped = torch.nn.functional.dropout(y, 0.1, training=True)
    assert torch.equal(replayed_dropout(y, dropped != 0, 0.1), dropped)
    write_draws(tmp_path / "empty", [], {}, source="test")
    with pytest.raises(Exception, match="holds 0 iterations"):
        ReplayedDraws(tmp_path / "empty").begin([0])


def test_draws_on_a_method_that_takes_none_are_refused(root):
    data = [o for o in TINY if o.startswith(("data.", "model.", "budget"))]
    proc = run_in_process(["distill", *data, *QUIET, "method=random", f"draws.record={root / 'unused'}",
                           "hydra.run.dir=outputs/random_draws"], root)
    assert proc.returncode == 2
    assert "method=random takes no draws" in proc.stderr
    assert not (root / "unused").exists()
