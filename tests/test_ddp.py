"""Several processes (mmdd.utils.ddp, mmdd.methods.engine.distributed): 2-process CPU DDP (gloo) distillation,
teachers and pre-training equal to their definitions, a dead or signalled process, students spread over processes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_mmdd
from helpers import (DDP, TINY_DISTILL, assert_same_set, distill, distill_here, manifest, signal_once_written, the_set,
                     trained_experts)


@pytest.mark.slow  # keeps the default suite under 10 minutes; `pytest -m slow`
def test_sigkill_of_a_ddp_run_then_resume_equals_the_uninterrupted_run(root):
    n = 200
    distill(root, "ddp_straight_long", f"method.iterations={n}", "save_every=5", *DDP)
    env = {**os.environ, "WANDB_MODE": "offline", "MMDD_ROOT": str(root)}
    cmd = [sys.executable, "-m", "mmdd.cli", "distill", *TINY_DISTILL, f"method.iterations={n}", "save_every=5", *DDP,
           "hydra.run.dir=outputs/ddp_killed"]
    # Its own process group: the kill reaches both ranks, as a node failure or `scancel --signal=KILL` would.
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = root / "outputs/ddp_killed/synthetic/checkpoint/last.ckpt"
    deadline = time.time() + 180
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = manifest(root, "ddp_killed")["iteration"]
    assert not manifest(root, "ddp_killed")["complete"] and 0 < killed_at < n
    out = distill(root, "ddp_killed", f"method.iterations={n}", "save_every=5", *DDP, check=False)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    assert_same_set(the_set(root, "ddp_killed"), the_set(root, "ddp_straight_long"))


@pytest.mark.slow  # 43 s; the default suite keeps DDP's written-once teachers and the gloo refusals (8-minute budget)
def test_two_process_ddp_step_equals_the_average_of_two_trajectory_samples(root):
    """gloo, 2 CPU processes: each rank matches its own expert/start/batches; the set's update is the one a
    single process makes with both samples' gradients averaged."""
    from hydra import compose, initialize_config_dir

    from mmdd.data.splits import load_data
    from mmdd.methods.engine.outer_loop import outer_optimizer
    from mmdd.methods.trajectory.draws import draw_segment_start
    from mmdd.methods.trajectory.objective import build_segment, meta_gradient_for
    from mmdd.utils.seed import rank_seed
    from mmdd.models.functional import ParamLayout
    from mmdd.methods.context import MethodContext
    from mmdd.models.dual_encoder import build_dual_encoder
    from mmdd.paths import conf_dir
    from hydra.utils import instantiate

    iterations = 2
    distill(root, "ddp", f"method.iterations={iterations}", *DDP)
    assert not (root / "outputs/ddp/synthetic_rank1").exists()

    overrides = [o for o in TINY_DISTILL if o != "evaluate=false"] + [f"method.iterations={iterations}"]
    os.environ["MMDD_ROOT"] = str(root)
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("distill", overrides=[*overrides, "paths.output_dir=unused"])
        train = load_data(cfg, splits=("train",))["train"]
        method = instantiate(cfg.method)
        torch.manual_seed(int(cfg.seed))
        model = build_dual_encoder(cfg.model, train.text_emb.shape[1], int(cfg.data.image_size))
        for p in model.parameters():
            p.requires_grad_(False)
        context = MethodContext.of(cfg, train, root / "unused")
        trajectories = context.store.open(model, method.settings.max_experts)
    finally:
        del os.environ["MMDD_ROOT"]
    syn = method.initial_set(context, context.budget)
    mc, layout = method.settings, ParamLayout.from_model(model)
    opt = outer_optimizer(syn, mc)
    gens = [torch.Generator().manual_seed(rank_seed(int(cfg.seed), r)) for r in range(2)]
    n_experts = trajectories.n_experts
    losses = []
    for _ in range(iterations):
        grads, step_losses = [], []
        for gen in gens:  # rank r's sample
            opt.zero_grad()
            e, s = draw_segment_start(gen, n_experts, mc.max_start_epoch)
            seg = build_segment(model, layout, syn, mc, *trajectories.segment(e, s, mc.expert_epochs), gen)
            loss, _ = meta_gradient_for(mc, model)(seg, lambda t, inputs: t.backward(inputs=inputs))
            step_losses.append(float(loss))
            grads.append([p.grad.clone() for p in syn.parameters()])
        losses.append(sum(step_losses) / 2)
        for p, g0, g1 in zip(syn.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
        syn.clamp_lrs_(mc.lr_min)
    ddp = the_set(root, "ddp")
    # Not bit-equal: each of the two processes runs on half the CPU threads, so kernels sum in another order.
    assert torch.allclose(ddp["images"], syn.images.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(ddp["texts"], syn.texts.detach(), rtol=1e-5, atol=1e-5)
    for m in ("image", "text"):
        assert torch.allclose(ddp[f"lr_{m}"], syn.lrs[m].detach().reshape(1), rtol=1e-5)
    history = __import__("json").loads((root / "outputs/ddp/synthetic/history.json").read_text())
    assert [h["distill/matching_loss"] for h in history] == pytest.approx(losses, rel=1e-5)  # mean over ranks
    # and it is not what one process makes alone
    distill_here(root, "single", f"method.iterations={iterations}")
    assert (the_set(root, "single")["images"] - ddp["images"]).abs().max() > 1e-2
    # The finished run, extended by one iteration, equals the run that did them all at once: every rank restores its
    # own generator and global RNG (rank 1's used to crash libtorch on a view of the saved states).
    out = distill(root, "ddp", f"method.iterations={iterations + 1}", *DDP, check=False)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    assert manifest(root, "ddp")["complete"] and manifest(root, "ddp")["iteration"] == iterations + 1
    distill(root, "ddp_straight", f"method.iterations={iterations + 1}", *DDP)
    assert_same_set(the_set(root, "ddp"), the_set(root, "ddp_straight"))


@pytest.mark.slow  # two teacher runs, one on 2 processes: ~30 s; the 2-process distillation tests keep DDP in the default suite
def test_one_expert_trained_with_ddp_on_two_processes_is_written_once_and_equals_the_one_process_expert(root):
    """The papers' batch split over the ranks, InfoNCE over all of it, the expert's own sample order: the 2-process
    expert's trajectory is the 1-process one's up to the order of float sums: in float64, 1e-11 after 3 epochs (float32's
    5e-7 after one epoch grows to 5e-2 by the third at this tiny model's lr 0.1). Without the draws made in each
    process's own loader: the per-image augmentation, and train_unit=image's caption per image."""
    stores = {n: root / f"outputs/artifacts/ddp_buffer_{n}" for n in (1, 2)}
    for n, store in stores.items():
        proc = run_mmdd(["buffer", *TINY, "logger=none", f"hardware.devices={n}", "hardware.strategy=ddp",
                         "teacher.num_experts=1", "teacher.augment=false", "data.train_unit=caption",
                         "hardware.precision=64-true",
                         f"buffer_dir={store}",
                         f"hydra.run.dir=outputs/ddp_buffer_{n}"],
                        root)
        assert proc.stdout.count("trajectory store:") == 1  # rank 0 reports; rank 1 only trains
        assert trained_experts(proc.stdout + proc.stderr) == {0}
    from mmdd.teachers.expert_records import expert_metrics
    from mmdd.teachers.trajectory_store import TrajectoryStore

    one, two = (TrajectoryStore.open(stores[n]) for n in (1, 2))
    assert two.completed_experts() == [0]
    a, b = one.load_expert(0), two.load_expert(0)
    assert b["text_head.projection.weight"].shape[0] == 4  # epochs + 1 snapshots
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-9), (name, (a[name] - b[name]).abs().max())
        assert (a[name][-1] - a[name][0]).abs().max() > 1e-3 or name.endswith("bias")  # it trained
    assert expert_metrics(stores[2])[0]["training"] == {
        "processes": 2, "global_batch": 16, "batch_per_process": 8, "loss": "infonce over the global batch",
        "sample_order": "the expert's seed (teacher.seed, expert)"}


@pytest.mark.slow  # two pre-trainings, one of them on 2 processes: ~40 s
def test_pretraining_on_two_processes_saves_once_the_one_process_backbone(root):
    """Pre-training shares the teachers' DDP: the batch split over the ranks, the loss over all of it, one sample
    order; process 0 alone evaluates and writes the backbone. float64, no augmentation (drawn in each loader)."""
    outs = {n: root / f"outputs/artifacts/ddp_pretrain_{n}.safetensors" for n in (1, 2)}
    for n, out in outs.items():
        proc = run_mmdd(["pretrain", *TINY, "logger=none", f"hardware.devices={n}", "hardware.strategy=ddp",
                         "hardware.precision=64-true", "data.augment=null", "data.train_unit=caption",
                         "pretrain.epochs=2", "pretrain.batch_size=16", f"pretrain.output={out}",
                         f"hydra.run.dir=outputs/ddp_pretrain_{n}"], root)
        assert (proc.stdout + proc.stderr).count("pretrained backbone saved to") == 1
    one, two = load_file(str(outs[1])), load_file(str(outs[2]))
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-9), (name, (one[name] - two[name]).abs().max())
    assert not list(outs[2].parent.glob(".*.tmp"))


def test_ddp_inside_a_local_multirun_is_refused_before_it_relaunches_the_sweep(root):
    proc = run_mmdd(["distill", "-m", *TINY_DISTILL, "method.iterations=2", "hardware.devices=2",
                     "hardware.strategy=ddp", "seed=0,1", "hydra.sweep.dir=outputs/ddp_multirun"], root, check=False)
    assert proc.returncode == 2 and "inside a local multirun" in proc.stderr


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow  # 55 s; `pytest -m slow`
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the rank-1 process through Linux's /proc")
def test_a_dead_ddp_process_is_named_and_the_run_resumes(root):
    """SIGKILL of rank 1 mid-run: rank 0's collective fails ("Connection reset by peer"), which was a traceback (or,
    by Lightning's process watch, a SIGKILL of rank 0 with no word); the run says which process died, exits 2, and
    resumes."""
    n = 400
    env = {**os.environ, "WANDB_MODE": "offline", "MMDD_ROOT": str(root)}
    cmd = [sys.executable, "-m", "mmdd.cli", "distill", *TINY_DISTILL, f"method.iterations={n}", "save_every=5", *DDP,
           "hydra.run.dir=outputs/ddp_rank1_killed"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = root / "outputs/ddp_rank1_killed/synthetic/checkpoint/last.ckpt"
    deadline = time.time() + 180
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    rank1 = _children(proc.pid)
    assert len(rank1) == 1 and proc.poll() is None, "rank 1 was not found running"
    os.kill(rank1[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "process 1 of 2 died" in err and "Rerun the same command to resume" in err and "Traceback" not in err
    killed_at = manifest(root, "ddp_rank1_killed")["iteration"]
    assert 0 < killed_at < n
    distill(root, "ddp_rank1_killed", f"method.iterations={n}", "save_every=5", *DDP)
    done = manifest(root, "ddp_rank1_killed")
    assert done["complete"] and done["resumed"][0]["iteration"] >= killed_at


def test_the_launcher_watch_names_a_dead_process_and_exits_2(tmp_path):
    """The other path: rank 0 not in a collective when rank 1 dies, so only rank 0's watch over the processes it
    started notices."""
    script = tmp_path / "watch.py"
    script.write_text(
        "import subprocess, sys\n"
        "from mmdd.utils.ddp import ProcessWatch\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)'])\n"
        "child.wait()\n"
        "ProcessWatch([child], world_size=4, first_rank=2).check()\n"
        "print('not stopped')\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MMDD_STAGE": "buffer"})
    assert proc.returncode == 2 and "not stopped" not in proc.stdout
    assert "mmdd buffer: error: process 3 of 4 (killed by SIGKILL) died" in proc.stderr


@pytest.mark.slow  # 47 s; `pytest -m slow`
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_every_ddp_process_stops_them_at_the_same_iteration(root, sig):
    """SLURM signals every task. Lightning's SIGTERM handler ran a collective inside the handler and stopped rank 0
    alone, so the two processes waited in different collectives for ever; now both stop after the same iteration,
    save it, say so, and the rerun finishes."""
    n = 300
    run = f"ddp_{sig.name}"
    ckpt = root / f"outputs/{run}/synthetic/checkpoint/last.ckpt"
    code, err = signal_once_written(root, ["distill", *TINY_DISTILL, f"method.iterations={n}", "save_every=50", *DDP,
                                           f"hydra.run.dir=outputs/{run}"], ckpt, sig)
    assert code == 128 + sig, (code, err[-3000:])
    stopped_at = manifest(root, run)["iteration"]
    assert f"stopped by {sig.name} at iteration {stopped_at} of {n}" in err and 50 <= stopped_at < n
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == stopped_at
    distill(root, run, f"method.iterations={n}", "save_every=50", *DDP)
    assert manifest(root, run)["complete"] and manifest(root, run)["resumed"][0]["iteration"] == stopped_at


@pytest.mark.slow  # about a minute; `pytest -m slow`
def test_a_signal_to_every_process_of_a_ddp_teacher_run_never_hangs(root):
    """Lightning's SIGTERM handler (a broadcast inside the handler; rank 0 stopping alone) hung a 2-process teacher
    run 1 time in 5; with SignalStop every kill ends with the sentence and the signal's code."""
    for k, (sig, experts_done) in enumerate([(signal.SIGTERM, 1), (signal.SIGTERM, 3), (signal.SIGINT, 2)]):
        store = root / f"outputs/artifacts/ddp_stop_{k}"
        code, err = signal_once_written(root, ["buffer", *TINY, "logger=none", "teacher.num_experts=40", *DDP,
                                               f"buffer_dir={store}", f"hydra.run.dir=outputs/ddp_stop_{k}"],
                                        store / f"expert_{experts_done:03d}.safetensors", sig, f"kill {k}: ")
        assert code == 128 + sig, (k, code, err[-3000:])
        assert f"stopped by {sig.name}; every complete expert is kept" in err and "died" not in err


@pytest.mark.slow  # a 2-process distillation with its students, and the same set evaluated by one process: ~1 min
def test_the_students_of_a_ddp_distillation_are_spread_over_its_processes(root):
    """Each process trains its share of the students on its own device (here: students 0 and 2 on process 0,
    student 1 on process 1); process 0 gathers them into the run's results.json, equal to one process training
    all three on the same set; every student logs its run (W&B offline, CSV), process 1's too."""
    import json

    run = ["protocol.num_seeds=3", "evaluate=true", "method.iterations=4", "logger=wandb"]
    run_mmdd(["distill", *[o for o in TINY_DISTILL if o != "logger=none"], *run, *DDP,
              "hydra.run.dir=outputs/ddp_students"], root)
    out = root / "outputs/ddp_students"
    parts = {r: json.loads((out / f"students_by_rank/rank_{r}/results.json").read_text()) for r in (0, 1)}
    assert [s["seed"] for s in parts[0]["seeds"]] == [0, 2] and [s["seed"] for s in parts[1]["seeds"]] == [1]
    assert len(list(out.glob("wandb/offline-run-*"))) == 1 + 3  # the distillation's and each student's
    assert {p.name for p in out.glob("students_by_rank/rank_*/csv/*")} == {f"mtt_vl_b8_student{k}" for k in range(3)}
    spread = json.loads((out / "results.json").read_text())
    assert spread["complete"] and sorted(s["seed"] for s in spread["seeds"]) == [0, 1, 2]
    evaluate = [o for o in TINY_DISTILL if not o.startswith("evaluate=")]
    proc = run_mmdd(["evaluate", *evaluate, "protocol.num_seeds=3", f"synthetic={out / 'synthetic'}",
                     "hydra.run.dir=outputs/ddp_students_one_process"], root)
    one = json.loads((root / "outputs/ddp_students_one_process/results.json").read_text())
    by_seed = {s["seed"]: s["test"] for s in one["seeds"]}
    assert all(s["test"] == by_seed[s["seed"]] for s in spread["seeds"]), proc.stdout[-2000:]
    assert spread["mean"] == one["mean"]
