"""A budget of faults: kill each stage at random moments, rerun it, and count what survived and what came out identical.

For every (stage, processes) case the script first runs the stage once uninterrupted (the reference, also the time
scale of the kills), then N trials in fresh run directories: start the stage, wait a uniformly random fraction of the
reference's wall time, send a random signal to the whole process group (SIGKILL: a node failure or OOM kill; SIGTERM:
SLURM's time limit or preemption; SIGINT: Ctrl-C; with two processes, a third of the kills are a SIGKILL of rank 1
alone), then rerun the same command until it exits 0 (at most
`--max-reruns`). A trial

- *survived* when a rerun finished (exit 0) and the interrupted process did not claim success for unfinished work
  (a stopped run exits non-zero: 143 / 130 / -9; exit 0 only when its output was already complete: the signal came
  after the work was done);
- is *identical* when the finished output equals the reference bit for bit: the store's expert trajectories and
  metrics (buffer), the synthetic set's tensors (distill), every student's test metrics (evaluate).

    python experiments/fault_budget.py --trials 5 --out experiments/fault_budget.md

Runs on CPU with the embedded dataset at a tiny size (two CPU processes on gloo for the DDP cases); about a minute
per trial on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TINY = ["data.generate.num_train=64", "data.generate.num_val=16", "data.generate.num_test=24", "model.image.width=8",
        "teacher.num_experts=3", "teacher.epochs=3", "teacher.batch_size=16", "method.syn_steps=2", "budget=8",
        "protocol.epochs=4", "protocol.lr_decay_epoch=2", "protocol.eval_every=2", "protocol.num_seeds=3",
        "logger=none", "progress_bar=false"]
DDP = ["hardware.devices=2", "hardware.strategy=ddp"]
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
EXPERTS = 3  # teacher.num_experts above


@dataclass
class Case:
    stage: str
    ddp: bool
    overrides: list[str]

    @property
    def name(self) -> str:
        return f"{self.stage} ({'2 processes' if self.ddp else '1 process'})"


@dataclass
class Tally:
    trials: int = 0
    survived: int = 0
    identical: int = 0
    signals: dict[str, int] = field(default_factory=dict)
    exits: dict[str, int] = field(default_factory=dict)
    reruns: int = 0
    failures: list[str] = field(default_factory=list)


def mmdd(root: Path, args: list[str], wait: bool = True):
    env = {**os.environ, "MMDD_ROOT": str(root), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "mmdd.cli", *args]
    if wait:
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    # Its own process group: the signal reaches every rank, as SLURM's or a node failure's would.
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def output_of(case: Case, root: Path, run: str) -> dict:
    """What a finished run produced, as comparable values."""
    from safetensors.torch import load_file

    if case.stage == "buffer":
        store = root / "stores" / run
        out = {}
        for f in sorted(store.glob("expert_*.safetensors")):
            out[f.name] = {k: v.numpy().tobytes() for k, v in load_file(str(f)).items()}
        for f in sorted(store.glob("expert_*.metrics.json")):
            out[f.name] = json.loads(f.read_text())
        return out
    if case.stage == "distill":
        tensors = load_file(str(root / "outputs" / run / "synthetic" / "synthetic.safetensors"))
        return {k: v.numpy().tobytes() for k, v in tensors.items()}
    results = json.loads((root / "outputs" / run / "results.json").read_text())
    return {s["seed"]: s["test"] for s in results["seeds"]}


def args_for(case: Case, run: str) -> list[str]:
    where = [f"buffer_dir={{root}}/stores/{run}"] if case.stage == "buffer" else []
    return [case.stage, *case.overrides, *where, f"hydra.run.dir=outputs/{run}"]


def is_complete(case: Case, root: Path, run: str) -> bool:
    """Whether the run's output was whole when its process ended (so that exit 0 was honest)."""
    try:
        if case.stage == "buffer":
            return len(list((root / "stores" / run).glob("expert_*.safetensors"))) == EXPERTS
        name = "synthetic/manifest.json" if case.stage == "distill" else "results.json"
        return json.loads((root / "outputs" / run / name).read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def run_to_end(case: Case, root: Path, run: str, max_reruns: int) -> tuple[bool, int]:
    """Rerun until exit 0; (finished, reruns used)."""
    for k in range(1, max_reruns + 1):
        proc = mmdd(root, [a.format(root=root) for a in args_for(case, run)])
        if proc.returncode == 0:
            return True, k
    print(proc.stderr[-2000:], file=sys.stderr)
    return False, max_reruns


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def trial(case: Case, root: Path, run: str, reference: dict, seconds: float, rng: random.Random, tally: Tally,
          max_reruns: int) -> None:
    sig = rng.choice(SIGNALS)
    # Several processes: a third of the kills hit rank 1 alone (SIGKILL: its node or the OOM killer), the rest the
    # whole group; rank 0 must then stop too, say which process died, and leave a run that resumes.
    one_rank = case.ddp and rng.random() < 1 / 3
    if one_rank:
        sig = signal.SIGKILL
    at = rng.uniform(0.05, 1.0) * seconds
    proc = mmdd(root, [a.format(root=root) for a in args_for(case, run)], wait=False)
    time.sleep(at)
    if proc.poll() is None:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        kids = [int(p) for p in children.read_text().split()] if one_rank and children.exists() else []
        ranks = [k for k in kids if b"LOCAL_RANK=1\x00" in _environ(k)]  # not a DataLoader worker
        if ranks:
            os.kill(ranks[0], sig)
        else:
            one_rank = False  # rank 1 not started yet (or gone): the whole group instead
            os.killpg(proc.pid, sig)
    name = f"{sig.name} to rank 1" if one_rank else sig.name
    try:
        proc.communicate(timeout=max(120.0, 5 * seconds))
    except subprocess.TimeoutExpired:  # a stage that hangs after a signal is the worst outcome: count it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        tally.trials += 1
        tally.signals[name] = tally.signals.get(name, 0) + 1
        tally.exits["hung"] = tally.exits.get("hung", 0) + 1
        tally.failures.append(f"{run}: {name} at {at:.1f}s: hung (killed after {max(120.0, 5 * seconds):.0f} s)")
        return
    code = proc.returncode
    claimed_success = code == 0 and not is_complete(case, root, run)
    tally.trials += 1
    tally.signals[name] = tally.signals.get(name, 0) + 1
    tally.exits[str(code)] = tally.exits.get(str(code), 0) + 1
    finished, reruns = run_to_end(case, root, run, max_reruns)
    tally.reruns += reruns
    if not finished:
        tally.failures.append(f"{run}: {sig.name} at {at:.1f}s, exit {code}; no rerun finished")
        return
    if claimed_success:  # exit 0 is a promise that the work is done
        tally.failures.append(f"{run}: {sig.name} at {at:.1f}s: exit 0 with the output unfinished")
        return
    tally.survived += 1
    if output_of(case, root, run) == reference:
        tally.identical += 1
    else:
        tally.failures.append(f"{run}: {sig.name} at {at:.1f}s: finished but differs from the reference")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5, help="kills per (stage, processes) case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-reruns", type=int, default=3)
    ap.add_argument("--cases", default="buffer,distill,evaluate,buffer-ddp,distill-ddp")
    ap.add_argument("--root", help="working directory (default: a new temporary one)")
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.root or tempfile.mkdtemp(prefix="mmdd-faults-"))
    root.mkdir(parents=True, exist_ok=True)

    distill = ["method.iterations=150", "save_every=5", "evaluate=false"]
    cases = {
        "buffer": Case("buffer", False, TINY), "buffer-ddp": Case("buffer", True, TINY + DDP),
        "distill": Case("distill", False, TINY + distill), "distill-ddp": Case("distill", True, TINY + distill + DDP),
        "evaluate": Case("evaluate", False, TINY),
    }
    # The shared inputs: a store for distill, a set for evaluate (not part of any count).
    base = mmdd(root, ["buffer", *TINY, f"buffer_dir={root}/stores/base", "hydra.run.dir=outputs/base_buffer"])
    assert base.returncode == 0, base.stderr[-3000:]
    for c in cases.values():
        if c.stage != "buffer":
            c.overrides = [*c.overrides, f"buffer_dir={root}/stores/base"]
    made = mmdd(root, ["distill", *TINY, *distill, f"buffer_dir={root}/stores/base", "hydra.run.dir=outputs/base_set"])
    assert made.returncode == 0, made.stderr[-3000:]
    cases["evaluate"].overrides = [*cases["evaluate"].overrides, f"synthetic={root}/outputs/base_set/synthetic"]

    rows = []
    for key in args.cases.split(","):
        case = cases[key]
        t0 = time.perf_counter()
        finished, _ = run_to_end(case, root, f"{key}_reference", 1)
        assert finished, f"the uninterrupted {case.name} failed"
        seconds = time.perf_counter() - t0
        reference = output_of(case, root, f"{key}_reference")
        tally = Tally()
        for t in range(args.trials):
            trial(case, root, f"{key}_{t}", reference, seconds, rng, tally, args.max_reruns)
            print(f"{case.name}: trial {t + 1}/{args.trials}: survived {tally.survived}, identical {tally.identical}",
                  file=sys.stderr, flush=True)
        rows.append((case, seconds, tally))

    lines = ["| stage | uninterrupted | kills (signals) | exit codes of the killed runs | survived | identical | "
             "reruns |", "|---|---|---|---|---|---|---|"]
    for case, seconds, t in rows:
        sigs = ", ".join(f"{k} {v}" for k, v in sorted(t.signals.items()))
        exits = ", ".join(f"{k}: {v}" for k, v in sorted(t.exits.items()))
        lines.append(f"| {case.name} | {seconds:.0f} s | {t.trials} ({sigs}) | {exits} | {t.survived}/{t.trials} | "
                     f"{t.identical}/{t.trials} | {t.reruns} |")
    failures = [f for _, _, t in rows for f in t.failures]
    text = "\n".join(lines) + ("\n\nFailures:\n" + "\n".join(f"- {f}" for f in failures) if failures else "")
    print(text)
    if args.out:
        from mmdd.utils.io import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")


if __name__ == "__main__":
    main()
