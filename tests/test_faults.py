"""Never lose work: kill-and-resume, extending a finished run, NaN steps, 2-process DDP distillation."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_in_process, run_mmdd

TINY_DISTILL = [o for o in TINY if not o.startswith("method.iterations")] + ["logger=none", "evaluate=false"]
DDP = ["hardware.devices=2", "hardware.strategy=ddp"]  # two CPU processes (gloo)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    run_mmdd(["buffer", *TINY, "logger=none", "hydra.run.dir=outputs/buffer"], root)
    return root


def distill(root: Path, run: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_mmdd(["distill", *TINY_DISTILL, *overrides, f"hydra.run.dir=outputs/{run}"], root, check=check)


def distill_here(root: Path, run: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """`distill` in this process (conftest.run_in_process), for runs whose assertions are on files and messages."""
    return run_in_process(["distill", *TINY_DISTILL, *overrides, f"hydra.run.dir=outputs/{run}"], root, check=check)


def the_set(root: Path, run: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / "outputs" / run / "synthetic" / "synthetic.safetensors"))


def manifest(root: Path, run: str) -> dict:
    import json

    return json.loads((root / "outputs" / run / "synthetic" / "manifest.json").read_text())


def assert_same_set(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def signal_once_written(root: Path, args: list[str], marker: Path, sig: int, what: str = "") -> tuple[int, str]:
    """Start `mmdd <args>` in its own process group, send `sig` to the group (every rank, as SLURM does) once
    `marker` exists, and return (exit code, stderr); a run that does not end within 90 s fails the test as hung."""
    env = {**os.environ, "WANDB_MODE": "offline", "MMDD_ROOT": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "mmdd.cli", *args], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{what}the processes hung after {signal.Signals(sig).name}")
    return proc.returncode, err


def test_sigkill_then_resume_equals_the_uninterrupted_run(root):
    n = 300  # long enough that the kill lands mid-run (a tiny iteration is ~20 ms)
    distill_here(root, "straight", f"method.iterations={n}", "save_every=5")

    env = {**os.environ, "WANDB_MODE": "offline", "MMDD_ROOT": str(root)}
    cmd = [sys.executable, "-m", "mmdd.cli", "distill", *TINY_DISTILL, f"method.iterations={n}", "save_every=5",
           "hydra.run.dir=outputs/killed"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = root / "outputs/killed/synthetic/checkpoint/last.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)  # a few more checkpoints
    # A save writes the set, then the checkpoint: kill once the checkpoint is the newer file, so the manifest read
    # below names the iteration the checkpoint holds (a kill between the two writes would resume one save earlier).
    saved = root / "outputs/killed/synthetic/manifest.json"
    while proc.poll() is None and time.time() < deadline and ckpt.stat().st_mtime_ns < saved.stat().st_mtime_ns:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = manifest(root, "killed")["iteration"]
    assert not manifest(root, "killed")["complete"] and 0 < killed_at < n

    distill_here(root, "killed", f"method.iterations={n}", "save_every=5")  # same command, same directory
    assert manifest(root, "killed")["resumed"][0]["iteration"] == killed_at
    assert manifest(root, "killed")["complete"]
    assert_same_set(the_set(root, "killed"), the_set(root, "straight"))
    history = __import__("json").loads((root / "outputs/killed/synthetic/history.json").read_text())
    assert [h["iteration"] for h in history] == list(range(1, n + 1))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143),
                                       pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_a_stop_signal_saves_the_iteration_says_so_and_exits_with_the_signals_code(root, sig, code):
    """SIGTERM is what SLURM sends at a time limit or preemption; SIGINT is Ctrl-C. Both finish the iteration in
    progress, save the set and a checkpoint at it, say where the run stopped, and exit 128 + signal (not 0 or 1)."""
    n, run = 60, f"stopped_{sig.name}"
    env = {**os.environ, "WANDB_MODE": "offline", "MMDD_ROOT": str(root)}
    cmd = [sys.executable, "-m", "mmdd.cli", "distill", *TINY_DISTILL, f"method.iterations={n}", "save_every=5",
           f"hydra.run.dir=outputs/{run}"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = root / f"outputs/{run}/synthetic/manifest.json"  # written with the first periodic save
    deadline = time.time() + 120
    while not history.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    m = manifest(root, run)
    stopped_at = m["iteration"]
    assert not m["complete"] and 0 < stopped_at < n, m
    assert f"stopped by {sig.name} at iteration {stopped_at} of {n}" in err and "rerun the same command" in err
    assert err.count("stopped by") == 1, err[-2000:]  # said once (it was said again as "nothing had started")
    state = torch.load(root / f"outputs/{run}/synthetic/checkpoint/last.ckpt", weights_only=True)
    assert state["global_step"] == stopped_at  # the checkpoint is at the stop, not at the last periodic save
    distill_here(root, run, f"method.iterations={n}", "save_every=5")
    assert manifest(root, run)["complete"] and manifest(root, run)["resumed"][0]["iteration"] == stopped_at


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


@pytest.mark.slow  # keeps the default suite under 10 minutes; `pytest -m slow`
def test_a_finished_run_extends_with_more_iterations(root):
    distill(root, "short_then_long", "method.iterations=7", "save_every=0")
    distill(root, "short_then_long", "method.iterations=12", "save_every=0")
    distill(root, "long", "method.iterations=12", "save_every=0")
    assert manifest(root, "short_then_long")["iteration"] == 12
    assert_same_set(the_set(root, "short_then_long"), the_set(root, "long"))


@pytest.mark.slow  # keeps the default suite under 10 minutes; `pytest -m slow`
def test_resume_may_change_the_outer_learning_rates_and_records_it(root):
    """E.g. after a run stopped on NaN losses: continue from the last checkpoint with a lower lr_img."""
    for run in ("lowered", "kept"):
        distill(root, run, "method.iterations=4", "save_every=2")
    distill(root, "lowered", "method.iterations=8", "method.lr_img=20")
    distill(root, "kept", "method.iterations=8")
    lowered, kept = manifest(root, "lowered"), manifest(root, "kept")
    assert lowered["resumed"] == [{"iteration": 4, "changed": ["lr_img: 200.0 -> 20.0"]}]
    assert kept["resumed"] == [{"iteration": 4, "changed": []}]
    assert lowered["diagnostics"]["initial"] == kept["diagnostics"]["initial"]  # the first start's, kept
    step = (the_set(root, "lowered")["images"] - the_set(root, "kept")["images"]).abs().max()
    assert step > 0  # the new learning rate took effect after iteration 4


def test_resume_refuses_a_checkpoint_of_other_settings(root):
    distill_here(root, "other", "method.iterations=3")
    proc = distill_here(root, "other", "method.iterations=3", "method.syn_steps=3", check=False)
    assert proc.returncode == 2
    assert "another distillation" in proc.stderr and "(method.syn_steps: 2 -> 3)" in proc.stderr
    proc = distill_here(root, "other", "method.iterations=2", check=False)
    assert proc.returncode == 2 and "beyond method.iterations=2" in proc.stderr
    proc = distill_here(root, "fresh", "method.iterations=3", "resume=outputs/nowhere", check=False)
    assert proc.returncode == 2 and "no checkpoint at" in proc.stderr


def test_nan_steps_are_skipped_then_the_run_stops_with_the_last_good_set(root):
    proc = distill(root, "nan", "method.iterations=50", "method.lr_img=1e35", "max_nonfinite=3", check=False)
    assert proc.returncode == 2
    assert "3 iterations in a row had a NaN/inf" in proc.stderr
    assert (proc.stdout + proc.stderr).count("step skipped") == 3
    m = manifest(root, "nan")
    assert not m["complete"] and m["iteration"] >= 1
    assert all(torch.isfinite(t).all() for t in the_set(root, "nan").values())
    # a checkpoint of that set, so a rerun with lower learning rates continues from it
    state = torch.load(root / "outputs/nan/synthetic/checkpoint/last.ckpt", weights_only=True)
    assert state["global_step"] == m["iteration"] and state["mmdd"]["skipped_iterations"] == 3


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
    from mmdd.teachers.trajectory_store import open_checked_trajectories
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
        trajectories = open_checked_trajectories(cfg, model, method.config.max_experts)
    finally:
        del os.environ["MMDD_ROOT"]
    syn = method.initial_set(cfg, train, int(cfg.budget))
    mc, layout = method.config, ParamLayout.from_model(model)
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


def buffer_cmd(root: Path, run: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mmdd.cli", "buffer", *TINY, "logger=none", *overrides, f"hydra.run.dir=outputs/{run}"]


def trained_experts(log: str) -> set[int]:
    import re

    return {int(m) for m in re.findall(r"expert (\d+): test r_mean", log)}


@pytest.mark.slow  # keeps the default suite under 10 minutes; `pytest -m slow`
def test_two_buffer_processes_fill_one_store_without_clashing(root):
    env = {**os.environ, "WANDB_MODE": "offline", "MMDD_ROOT": str(root)}
    store = root / "outputs/artifacts/shared"
    procs = [subprocess.Popen(buffer_cmd(root, f"buf_{i}", "teacher.num_experts=4", f"buffer_dir={store}"), cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    trained = [trained_experts(log) for log in logs]
    assert trained[0] | trained[1] == {0, 1, 2, 3} and not trained[0] & trained[1], trained  # each exactly once
    assert sorted(p.name for p in store.glob("expert_*.safetensors")) == [f"expert_{e:03d}.safetensors" for e in range(4)]
    assert not list(store.glob("*.claim")) and not list(store.glob("*.stale-*"))


def test_claims_of_dead_processes_are_taken_over_and_live_ones_respected(root):
    import json
    import socket

    store = root / "outputs/artifacts/claims"
    store.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    (store / "expert_001.claim").write_text(json.dumps({"host": host, "pid": gone.pid}))  # a killed run's claim
    (store / "expert_002.claim").write_text(json.dumps({"host": host, "pid": os.getpid()}))  # alive: this test
    proc = run_mmdd(["buffer", *TINY, "logger=none", "teacher.num_experts=3", f"buffer_dir={store}",
                     "hydra.run.dir=outputs/claims_1"], root)
    out = proc.stdout + proc.stderr
    assert trained_experts(out) == {0, 1}
    assert "taking over a stale claim" in out and f"expert 2 is being trained by {host} (pid {os.getpid()})" in out
    assert (store / "expert_001.safetensors").exists() and not (store / "expert_002.safetensors").exists()
    assert (store / "expert_002.claim").exists() and not (store / "expert_001.claim").exists()
    assert not list(store.glob("*.stale-*"))  # the moved-away claim is cleaned up with the finished expert


def test_unwritable_output_and_a_full_disk_fail_before_any_work(root):
    blocker = root / "a_file"
    blocker.write_text("not a directory")
    proc = distill(root, "nowhere", "method.iterations=2", f"synthetic_dir={blocker}/synthetic", check=False)
    assert proc.returncode == 2
    assert f"cannot write to {blocker}/synthetic (synthetic_dir)" in proc.stderr
    assert "loaded" not in proc.stdout  # failed before reading data or trajectories
    proc = distill(root, "full", "method.iterations=2", "paths.min_free_mb=1e12", check=False)
    assert proc.returncode == 2 and "MB free on the disk that holds" in proc.stderr and "paths.min_free_mb" in proc.stderr


@pytest.mark.slow  # keeps the default suite under 10 minutes; `pytest -m slow`
def test_students_spread_over_jobs_pool_into_the_same_cell(root):
    from mmdd.report.collect import collect

    distill(root, "spread_set", "method.iterations=2")
    syn = root / "outputs/spread_set/synthetic"
    common = ["evaluate", *TINY, "logger=none", f"synthetic={syn}", "protocol.num_seeds=2"]
    run_mmdd([common[0], "-m", *common[1:], "students=0,1", "hydra.sweep.dir=outputs/spread"], root)
    run_mmdd([*common, "hydra.run.dir=outputs/together"], root)
    spread, together = collect([root / "outputs/spread"]), collect([root / "outputs/together"])
    (a,), (b,) = spread.cells, together.cells
    assert len(a.runs) == 2 and a.seeds == "1×2" and b.seeds == "1×2"
    assert a.stats()[0] == b.stats()[0]
    # a 2-iteration set teaches nothing: said once for the set, whether its students ran in one job or two
    assert len(spread.problems) == 1 and spread.problems == together.problems
    assert spread.problems[0].startswith(f"{syn.resolve()}: all 2 students score at chance")
    run_mmdd([common[0], "-m", *common[1:], "protocol.num_seeds=3", "students=0,1", "hydra.sweep.dir=outputs/spread3"],
             root)
    missing = [p for p in collect([root / "outputs/spread3"]).problems if "at chance" not in p]
    assert len(missing) == 1 and "2 of 3 students evaluated (a `students=` job is missing)" in missing[0]
    proc = run_mmdd([*common, "students=2", "hydra.run.dir=outputs/bad_students"], root, check=False)
    assert proc.returncode == 2 and "indices must lie in 0..1" in proc.stderr


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


def test_a_corrupted_checkpoint_is_refused_not_loaded(root):
    distill_here(root, "corrupt", "method.iterations=4", "save_every=2")
    ckpt = root / "outputs/corrupt/synthetic/checkpoint/last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated
    before = the_set(root, "corrupt")
    proc = distill_here(root, "corrupt", "method.iterations=8", check=False)
    assert proc.returncode == 2 and f"checkpoint {ckpt} cannot be used" in proc.stderr and "resume=false" in proc.stderr
    assert_same_set(the_set(root, "corrupt"), before)  # nothing overwritten
    distill_here(root, "corrupt", "method.iterations=8", "resume=false")  # starts over
    assert manifest(root, "corrupt")["complete"] and manifest(root, "corrupt")["iteration"] == 8


def test_ddp_inside_a_local_multirun_is_refused_before_it_relaunches_the_sweep(root):
    proc = run_mmdd(["distill", "-m", *TINY_DISTILL, "method.iterations=2", "hardware.devices=2",
                     "hardware.strategy=ddp", "seed=0,1", "hydra.sweep.dir=outputs/ddp_multirun"], root, check=False)
    assert proc.returncode == 2 and "inside a local multirun" in proc.stderr


def test_a_write_that_fails_mid_run_stops_with_a_message_and_leaves_no_partial_file(root):
    """A real failing write: the process's file-size limit (RLIMIT_FSIZE) is below the checkpoint's size, so
    Lightning's checkpoint write fails with EFBIG, like a disk that fills up during the run."""
    import resource

    env = {**os.environ, "WANDB_MODE": "offline", "MMDD_ROOT": str(root)}
    cmd = [sys.executable, "-m", "mmdd.cli", "distill", *TINY_DISTILL, "method.iterations=4", "save_every=2",
           "hydra.run.dir=outputs/limited"]
    limit = 200 * 1024  # the set (~110 KB) fits, the checkpoint (set + model + optimizer) does not
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "writing the checkpoint" in proc.stderr and "file-size limit" in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpt_dir = root / "outputs/limited/synthetic/checkpoint"
    assert not list(ckpt_dir.glob("*"))  # no truncated checkpoint left to resume from
    assert manifest(root, "limited")["iteration"] == 2  # the set saved before the failure is intact


class _RunsCode:
    """A pickle that, when unpickled, creates `marker` (any code could run the same way)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_unpickling_it(tmp_path):
    from mmdd.errors import ArtifactError
    from mmdd.methods.engine.checkpointing import resume_checkpoint

    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "handed_over.ckpt"
    torch.save({"mmdd": {}, "state_dict": {}, "payload": _RunsCode(marker)}, ckpt)
    with pytest.raises(ArtifactError, match=rf"checkpoint {ckpt} cannot be used \(UnpicklingError"):
        resume_checkpoint(str(ckpt), tmp_path / "synthetic")
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # what a full unpickle does with it
    assert marker.exists()


def test_a_checkpoint_is_written_beside_itself_and_renamed_so_a_failed_write_keeps_the_last_one(tmp_path, monkeypatch):
    from mmdd.methods.engine import distributed

    io = distributed.GuardedCheckpointIO()
    path = tmp_path / "checkpoint" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    assert io.take_error() is None and torch.load(path, weights_only=True)["step"] == 1
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real_replace(src, dst)))
    io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert [(s.parent, d) for s, d in renames] == [(path.parent, path)]  # staged in the same directory, not TMPDIR

    def dies_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(distributed.torch, "save", dies_mid_write)
    io.save_checkpoint({"step": torch.tensor(3)}, path)
    assert isinstance(io.take_error(), OSError)
    assert torch.load(path, weights_only=True)["step"] == 2  # the previous checkpoint, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left


def test_temp_files_of_killed_writers_and_claims_on_complete_experts_are_cleaned(tmp_path):
    import socket

    from mmdd.teachers.claims import ExpertClaims
    from mmdd.utils.io import atomic_write, remove_stale_temp_files

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    left = tmp_path / f".synthetic.safetensors~{dead_pid}~{host}~abc123.tmp"
    live = tmp_path / f".manifest.json~{os.getpid()}~{host}~def456.tmp"
    other_host = tmp_path / f".history.json~{dead_pid}~another-host~ghi789.tmp"
    kept = tmp_path / "synthetic.safetensors"
    for p in (left, live, other_host, kept):
        p.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [left]
    assert live.exists() and other_host.exists() and kept.exists()  # alive, or not ours to judge yet
    old = time.time() - 2 * 24 * 3600
    os.utime(other_host, (old, old))
    assert remove_stale_temp_files(tmp_path) == [other_host]
    # what atomic_write leaves behind when killed is recognised as its own
    names = []
    atomic_write(tmp_path / "a.json", lambda p: names.append(p.name) or p.write_text("{}"))
    assert names[0].startswith(f".a.json~{os.getpid()}~{host}~") and names[0].endswith(".tmp")

    claims = ExpertClaims(tmp_path)
    assert claims.try_claim(0) and claims.try_claim(1)
    claims.release_complete([0])
    assert not claims.path(0).exists() and claims.path(1).exists()


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


# SIGINT takes the same path as SIGTERM (mmdd.utils.signal_stop): slow, to keep the default suite under 8 minutes
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_teachers_stopped_by_a_signal_say_so_and_exit_with_its_code(root, sig):
    """Lightning turns SIGTERM during training into a SystemExit without a code (exit 0, as if the teachers were
    done) and Ctrl-C into exit 1; both are a sentence and 128 + the signal's number, the finished experts kept."""
    store = root / f"outputs/artifacts/stopped_{sig.name}"
    code, err = signal_once_written(root, ["buffer", *TINY, "logger=none", "teacher.num_experts=40",
                                           f"buffer_dir={store}", f"hydra.run.dir=outputs/stopped_{sig.name}"],
                                    store / "expert_001.safetensors", sig)
    assert code == 128 + sig, (code, err[-2000:])
    assert f"mmdd buffer: stopped by {sig.name}; every complete expert is kept" in err and "Traceback" not in err
    kept = len(list(store.glob("expert_*.safetensors")))
    assert 2 <= kept < 40


def test_a_store_is_extended_with_more_experts(root, tmp_path):
    """`teacher.num_experts=3` on a store of 2 trains expert 2 only (the store was refused as "another
    configuration": its hash counted the experts asked for)."""
    import shutil

    from mmdd.teachers.trajectory_store import TrajectoryStore

    made = next((root / "outputs" / "artifacts" / "buffers" / "synscenes").iterdir())
    store = tmp_path / "store"
    shutil.copytree(made, store)
    before = {p.name: p.stat().st_mtime_ns for p in store.glob("expert_*.safetensors")}
    proc = run_in_process(["buffer", *TINY, "logger=none", "teacher.num_experts=3", f"buffer_dir={store}",
                           "hydra.run.dir=outputs/extend"], root, check=True)
    assert proc.returncode == 0
    assert TrajectoryStore.open(store).completed_experts() == [0, 1, 2]
    assert {p: store.joinpath(p).stat().st_mtime_ns for p in before} == before  # experts 0 and 1 untouched


@pytest.mark.slow  # about a minute; the figures in the README come from a longer run of the same script
def test_the_fault_budget_script_counts_a_killed_evaluation(tmp_path):
    out = tmp_path / "budget.md"
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "experiments" / "fault_budget.py"),
                           "--trials", "1", "--cases", "evaluate", "--root", str(tmp_path / "w"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in out.read_text().splitlines() if line.startswith("| evaluate (1 process)"))
    assert "| 1/1 | 1/1 |" in row


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


def test_snapshots_kept_on_the_device_between_draws_give_the_same_set(root):
    """hardware.snapshot_cache_mb (auto on a GPU): the matching only reads the cached snapshots."""
    distill_here(root, "snapshot_cache", "method.iterations=6", "hardware.snapshot_cache_mb=64", check=True)
    distill_here(root, "no_snapshot_cache", "method.iterations=6", "hardware.snapshot_cache_mb=0", check=True)
    assert_same_set(the_set(root, "snapshot_cache"), the_set(root, "no_snapshot_cache"))


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
