"""PTM-ST's pieces on the trajectory-matching core: shortcut (convexified) trajectories against their definition,
start windows, and the EMA of the set; and one phase through the real `mmdd distill`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, run_in_process
from helpers import method_settings
from mmdd.errors import MmddError
from mmdd.methods.engine.outer_loop import OuterLoopModule
from mmdd.methods.trajectory.draws import draw_segment_start
from mmdd.methods.trajectory.objective import MatchingSettings
from mmdd.synthetic.synthetic_set import SyntheticSet
from mmdd.methods.trajectory.shortcut import ConvexifiedSnapshots, ConvexifySettings, shortcut_betas
from mmdd.teachers.trajectory_store import ExpertSnapshots, TrajectoryStore

NAMES = {"image": ["w", "still"], "text": ["t"]}
SHAPES = {"w": [2, 2], "still": [3], "t": [4]}


def test_shortcut_betas_are_cumulative_step_norms_over_their_total():
    assert shortcut_betas(torch.tensor([1.0, 3.0])).tolist() == [0.0, 0.25, 1.0]
    assert shortcut_betas(torch.tensor([2.0, 0.0, 2.0])).tolist() == [0.0, 0.5, 0.5, 1.0]
    assert shortcut_betas(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0, 0.0]  # a tensor that never moved stays


def store_with_one_expert(root, epochs=5):
    gen = torch.Generator().manual_seed(0)
    store = TrajectoryStore.create_or_open(root, dataset="d", model="m", config_hash="h", param_names=NAMES,
                                           param_shapes=SHAPES, epochs=epochs, teacher={})
    traj = {n: torch.randn([epochs + 1, *s], generator=gen).cumsum(0) for n, s in SHAPES.items()}
    traj["still"] = torch.ones(epochs + 1, 3)  # never moves
    store.save_expert(0, traj)
    return store, traj


def test_convexified_snapshots_follow_the_definition(tmp_path):
    store, traj = store_with_one_expert(tmp_path / "s")
    recorded = ExpertSnapshots(store, NAMES, [0])
    short = ConvexifiedSnapshots(recorded, ConvexifySettings(start=1, end=5))  # snapshots 1..4, K = 3
    assert short.epochs == 3 and short.n_experts == 1
    got = short.snapshots(0, [0, 1, 2, 3])
    for name, modality, offset in (("w", "image", 0), ("still", "image", 4), ("t", "text", 0)):
        kept = traj[name][1:5].double()
        size = kept[0].numel()
        norms = [float((kept[p + 1] - kept[p]).norm()) for p in range(3)]
        for t in range(4):
            beta = sum(norms[:t]) / sum(norms) if sum(norms) else 0.0
            want = (1 - beta) * kept[0] + beta * kept[3]
            value = got[t][modality][offset:offset + size].reshape(kept[0].shape).double()
            assert torch.allclose(value, want, atol=1e-6), (name, t)
    # the endpoints are the recorded snapshots, bit for bit
    assert torch.equal(got[0]["image"], recorded.snapshots(0, [1])[0]["image"])
    assert torch.equal(got[3]["text"], recorded.snapshots(0, [4])[0]["text"])
    start, target = short.segment(0, 1, 2)
    assert torch.equal(start["image"], got[1]["image"]) and torch.equal(target["text"], got[3]["text"])
    with pytest.raises(MmddError, match="records epochs 0..5"):
        ConvexifiedSnapshots(recorded, ConvexifySettings(start=0, end=7))
    with pytest.raises(MmddError, match="at least two snapshots"):
        ConvexifySettings(start=3, end=4)


class TinyModel(torch.nn.Module):
    """A model whose matched parameters are the store's (for the objective's checks)."""

    def __init__(self, names, shapes):
        super().__init__()
        self.names = names
        self.params = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.zeros(s)) for n, s in shapes.items()})

    def named_parameters(self, *args, **kwargs):
        return ((n, p) for n, p in self.params.items())

    def modality_parameter_names(self):
        return self.names


def test_convexify_handles_scalar_parameters_and_windows_reach_the_last_snapshot(tmp_path):
    """A 0-d tensor (timm NFNets' skipinit gains) is convexified like any other; a window whose last start plus
    expert_epochs lands on the last kept snapshot is accepted, one further is refused, naming convexify.end."""
    from mmdd.methods.trajectory.objective import TrajectoryMatchingObjective

    names, shapes = {"image": ["gain"], "text": ["t"]}, {"gain": [], "t": [2]}
    store = TrajectoryStore.create_or_open(tmp_path / "s", dataset="d", model="m", config_hash="h", param_names=names,
                                           param_shapes=shapes, epochs=3, teacher={})
    store.save_expert(0, {"gain": torch.tensor([0.0, 1.0, 3.0, 4.0]), "t": torch.zeros(4, 2)})
    short = ConvexifiedSnapshots(ExpertSnapshots(store, names, [0]), ConvexifySettings(start=0, end=4))
    got = short.snapshots(0, [1, 2])  # step norms 1, 2, 1: beta = 1/4 and 3/4 of the way from 0 to 4
    assert [float(g["image"][0]) for g in got] == [1.0, 3.0]
    settings = dict(lr_img=1, lr_txt=1, lr_lr=0, lr_init=0.1, syn_steps=1, min_start_epoch=0)
    model = TinyModel(names, shapes)
    TrajectoryMatchingObjective(model, short, method_settings(MatchingSettings, "mtt_vl", **settings, expert_epochs=1,
                                                              max_start_epoch=3))
    with pytest.raises(MmddError, match="convexify.end"):
        TrajectoryMatchingObjective(model, short, method_settings(MatchingSettings, "mtt_vl", **settings,
                                                                  expert_epochs=2, max_start_epoch=3))


def test_start_windows_draw_within_min_and_max():
    gen = torch.Generator().manual_seed(0)
    starts = {draw_segment_start(gen, 3, 3, 1)[1] for _ in range(200)}
    assert starts == {1, 2}  # PTM-ST's window "1-3": randint(1, 3)
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    # min 0 draws exactly as before windows existed (committed runs keep their draws)
    for _ in range(20):
        expert, start = draw_segment_start(a, 4, 3)
        assert (expert, start) == (int(torch.randint(4, (1,), generator=b)), int(torch.randint(3, (1,), generator=b)))
    with pytest.raises(MmddError, match="min_start_epoch"):
        method_settings(MatchingSettings, "mtt_vl", syn_steps=1, expert_epochs=1, max_start_epoch=2,
                        min_start_epoch=2)


def sets_after_each_step(loop, syn, steps: int) -> list[torch.Tensor]:
    """Fit `loop` for `steps` outer steps; the synthetic images after each step."""
    from test_outer_loop import fit

    seen = []

    class Track:
        model = None

        def __call__(self, s, generator, backward):
            seen.append(s.images.detach().clone())  # the set before this step
            return inner(s, generator, backward)

    inner, loop.objective = loop.objective, Track()
    fit(loop, steps)
    return seen[1:] + [syn.images.detach().clone()]


def test_the_ema_of_the_set_is_saved_and_the_step_sizes_stay_learned():
    from test_outer_loop import SETTINGS, MeanMatchingObjective, MeanMatchingSettings, toy_set

    syn = toy_set()
    x0 = syn.images.detach().clone()
    settings = MeanMatchingSettings(**{**SETTINGS, "lr_lr": 0.0, "ema_decay": 0.9})

    class MeanProbe:  # the collapse diagnostics' interface: what they are computed on is what they see
        reference: dict = {}

        def to(self, device):
            return self

        def __call__(self, images, texts):
            return {"image_mean": float(images.mean())}

    loop = OuterLoopModule(MeanMatchingObjective(torch.full((1, 3, 4, 4), 2.0), torch.full((1, 5), -1.0)), syn, settings,
                     seed=0, probe=MeanProbe(), diagnostics_every=1)
    assert loop.saved_set() is loop.ema and torch.equal(loop.ema.images, x0)
    # the EMA by its definition, from the raw sets after each step
    raws = sets_after_each_step(loop, syn, 3)
    want = x0
    for x in raws:
        want = 0.9 * want + 0.1 * x
    assert torch.allclose(loop.ema.images, want, atol=1e-6) and not torch.allclose(loop.ema.images, syn.images)
    assert loop.ema.lr_values() == syn.lr_values()
    # the diagnostics describe the saved (EMA) set, not the raw iterate
    assert loop.diagnostics["final"]["image_mean"] == pytest.approx(float(loop.ema.images.mean()))
    with pytest.raises(MmddError, match="ema_decay"):
        MeanMatchingSettings(**{**SETTINGS, "ema_decay": 1.0})


def test_the_bias_corrected_ema_holds_no_weight_of_the_initial_set():
    """ema_bias_correction: e_T = sum_t (1-d) d^(T-t) x_t / (1 - d^T) over the sets after each step, so after one step
    the average is that set, and the initial set's weight d^T (PTM's average) is gone whatever T; its step count is
    checkpointed with the set."""
    from test_outer_loop import SETTINGS, MeanMatchingObjective, MeanMatchingSettings, fit, toy_set

    d = 0.9
    settings = MeanMatchingSettings(**{**SETTINGS, "lr_lr": 0.0, "ema_decay": d, "ema_bias_correction": True})

    def loop_of(syn):
        return OuterLoopModule(MeanMatchingObjective(torch.full((1, 3, 4, 4), 2.0), torch.full((1, 5), -1.0)), syn,
                               settings, seed=0)

    syn = toy_set()
    loop = loop_of(syn)
    fit(loop, 1)
    assert torch.equal(loop.ema.images, syn.images)  # one step: the average is the set itself

    syn = toy_set()
    loop = loop_of(syn)
    sets = sets_after_each_step(loop, syn, 3)
    T = len(sets)
    want = sum((1 - d) * d ** (T - t) * x for t, x in enumerate(sets, start=1)) / (1 - d**T)
    assert torch.allclose(loop.ema.images, want, atol=1e-6)
    assert int(loop.state_dict()["ema_updates"]) == T


@pytest.mark.slow  # the phases test below checks each phase's window through the same stage
def test_ptm_st_phase_distills_on_shortcuts_with_its_window(tmp_path):
    run_in_process(["buffer", *TINY, "hydra.run.dir=outputs/buffer"], tmp_path, check=True)
    run_in_process(["distill", "method=ptm_st", *TINY, "method.convexify.end=4", "method.min_start_epoch=1",
                    "method.max_start_epoch=2", "method.iterations=4", "evaluate=false", "hydra.run.dir=outputs/ptm"],
                   tmp_path, check=True)
    out = tmp_path / "outputs" / "ptm" / "synthetic"
    history = json.loads((out / "history.json").read_text())
    assert [h["distill/start_epoch"] for h in history] == [1.0] * 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "ptm_st" and manifest["inner_loss"] == "wbce"


def test_phases_are_distilled_in_turn_saved_beside_the_set_and_taught_in_order(root):
    # the shared tiny store (conftest.root): this test's runs under outputs/ptm_phases/
    phases = "method.phases=[{pairs: 3, min_start_epoch: 0, max_start_epoch: 1}, {pairs: 4, min_start_epoch: 1, max_start_epoch: 2, iterations: 2}]"
    args = ["distill", "method=ptm_st", *[o for o in TINY if "num_seeds" not in o], "protocol.num_seeds=1",
            "method.convexify.end=4", "method.iterations=3", phases, "hydra.run.dir=outputs/ptm_phases/ptm"]
    run_in_process(args, root, check=True)
    out = root / "outputs" / "ptm_phases" / "ptm" / "synthetic"
    first = json.loads((out / "phase_0" / "manifest.json").read_text())
    top = json.loads((out / "manifest.json").read_text())
    assert first["phase"] == 0 and first["num_pairs"] == 3 and "earlier_phases" not in first
    assert top["earlier_phases"] == ["phase_0"] and top["num_pairs"] == 4
    history = json.loads((out / "history.json").read_text())
    assert [(h["phase"], h["distill/start_epoch"]) for h in history] == [(0, 0)] * 3 + [(1, 1)] * 2
    storage = top["distill_stats"]["cost"]["storage"]  # both phases, each with its full S
    assert storage["pairs"] == 7 and storage["similarity"] == 3 * 3 + 4 * 4
    res = json.loads((root / "outputs" / "ptm_phases" / "ptm" / "results.json").read_text())
    assert {h["phase"] for h in res["seeds"][0]["history"]} == {0, 1}
    assert top["earlier_phase_identities"] == [first["phase_identity"]]
    # a rerun skips the complete first phase (its set is not rewritten) and keeps its history
    stamp = (out / "phase_0" / "synthetic.safetensors").stat().st_mtime_ns
    run_in_process([*args, "evaluate=false"], root, check=True)
    assert (out / "phase_0" / "synthetic.safetensors").stat().st_mtime_ns == stamp
    again = json.loads((out / "history.json").read_text())
    assert [(h["phase"], h["iteration"]) for h in again] == [(h["phase"], h["iteration"]) for h in history]
    assert json.loads((out / "manifest.json").read_text())["distill_stats"]["iterations"] == 5

    # more iterations: the complete first phase resumes to them (it is not skipped at its old count)
    more = [a.replace("method.iterations=3", "method.iterations=4") for a in args] + ["evaluate=false"]
    run_in_process(more, root, check=True)
    first = json.loads((out / "phase_0" / "manifest.json").read_text())
    assert first["iteration"] == 4 and first["resumed"][0]["iteration"] == 3
    assert [h["phase"] for h in json.loads((out / "history.json").read_text())] == [0] * 4 + [1] * 2

    # one checkpoint file cannot resume several phases
    refused = run_in_process([*more, f"resume={out / 'checkpoint' / 'last.ckpt'}"], root)
    assert refused.returncode == 2 and "not from one checkpoint file" in refused.stderr

    # an earlier phase written by another configuration is refused by the evaluation, not silently taught
    (out / "phase_0" / "manifest.json").write_text(json.dumps({**first, "phase_identity": "another"}))
    evaluate = ["evaluate", f"synthetic={out}", *[o for o in args[2:] if not o.startswith(("method.", "hydra."))],
                "hydra.run.dir=outputs/ptm_phases/eval"]
    stale = run_in_process(evaluate, root)
    assert stale.returncode == 2 and "phase_0/ was distilled by another configuration" in stale.stderr
    # resume=false starts every phase over, the complete first one too
    run_in_process([*more, "resume=false"], root, check=True)
    first = json.loads((out / "phase_0" / "manifest.json").read_text())
    assert first["phase_identity"] != "another" and "resumed" not in first

    # init_from=<a phased set>: each phase starts from that set's own phase (the parity harness's official initial
    # pairs); with every outer step size 0 and no EMA the saved phases are exactly those starts
    frozen = ["method.lr_img=0", "method.lr_txt=0", "method.lr_lr=0", "method.lr_sim=0", "method.ema_decay=null"]
    run_in_process([*[a.replace("hydra.run.dir=outputs/ptm_phases/ptm", "hydra.run.dir=outputs/ptm_phases/from") for a in more],
                    f"init_from={out}", "method.iterations=1", *frozen], root, check=True)
    copy = root / "outputs" / "ptm_phases" / "from" / "synthetic"
    for here, source in ((copy / "phase_0", out / "phase_0"), (copy, out)):
        assert torch.equal(SyntheticSet.load(here)[0].images, SyntheticSet.load(source)[0].images)
