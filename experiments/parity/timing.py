"""Speed against the official loop, not a port: `python experiments/parity/timing.py <method> --official <dir>`.

The same inputs as run.py (the embedded dataset in the BLIP Flickr30K layout, a random nfnet_l0, the random 768-d
stand-in BERT, two experts made by `mmdd buffer` and exported as the official replay-buffer files), the paper's
Flickr30K-100 flags (run.py's LORS) at `--budget`. Each round runs the official script (official.py --timing: only
the iteration boundaries are observed, nothing else of the process is wrapped) and then `mmdd distill` at mmdd's
defaults (the paper config's behaviour, mmdd's own draws), one process each, `--warmup` + `--iterations`
iterations; rounds alternate the two, so a slow spell of the machine hits both. Per iteration, both sides are timed
the same way: wall seconds from one iteration's start to the next's (official: its wandb.log({"Progress"}) to the
next; mmdd: `distill/wall_sec_per_iter`, from one outer step's end to the next's, the trainer's loop and logging
included). Peak memory: each process's peak resident set (the kernel's, from wait4), set-up included.

FLOPs and bytes (`--flops`, an extra untimed run per side): every operation of one iteration of each (official: its
last iteration; mmdd: its last outer step) with its FLOPs (PyTorch's FLOP counter formulas) and the bytes it reads
and writes (mmdd.bench.flops.OpCosts), and the machine's float32 matrix-multiply peak and copy bandwidth: the achieved
FLOP/s of each side, mmdd's FLOPs at the peak, and each side's roofline floor (each operation at the faster ceiling it
is bound by) and how close each side runs to it.

Writes <work>/timing_<budget>.json and prints a Markdown row; experiments/bench.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (DATA, LORS, METHODS, REPO, git_commit, mmdd_common, official_command, prepare,  # noqa: E402
                 script_args)

TIMED_METHODS = ("lors", "repblend")  # LoRS's and RepBlend's loops (TESLA); the cells
# At the paper's outer step sizes this random 32-px problem diverges within a few iterations (parity.md: RepBlend's
# loss is NaN at iteration 4 on both sides; the official loop then stops, mmdd skips the step), at run.py's stable
# lr 10 too from other pairs and draws than the parity runs': the learned step sizes swing through zero (lr_lr 0.01:
# 0.1 -> -0.15 in one step). Timed at run.py's stable outer step sizes and lr_lr 1e-5, which change no shape or
# operation of an iteration.
STABLE = {"lr_img": 10, "lr_txt": 10, "lr_sim": 1.0, "lr_lr": 1e-5}


def timed(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd` (output into `log`): wall seconds, the process's peak resident set in MB (wait4's ru_maxrss, the
    kernel's own high-water mark of the child) and its CPU seconds. Raises with the log's tail on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"failed ({code}): {' '.join(map(str, cmd))}\n--- {log} ---\n{log.read_text()[-4000:]}")
    # user and system CPU seconds: system time is mostly the kernel zeroing pages for large fresh allocations
    return {"wall": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024, "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime}


def official_cmd(official: Path, work: Path, inputs: dict, spec: dict, iterations: int, args, out: Path,
                 flops: bool) -> list[str]:
    """official.py --timing with the flags run.py's recorded runs use, `iterations` iterations, on `args.device` with
    the official process's allocator `args.official_cpu_heap`."""
    options = ["--timing", f"--cpu-heap={args.official_cpu_heap}", f"--device={args.device}",
               *(["--flops-last"] if flops else [])]
    return official_command(official, work, out, inputs, spec, options,
                            script_args(inputs, spec, inputs["buffers"], iterations, args.image_size, "timing"))


def mmdd_overrides(work: Path, inputs: dict, spec: dict, iterations: int, args, run_dir: Path) -> list[str]:
    """`mmdd distill` at the same settings, at mmdd's defaults otherwise: the paper configs' behaviour where it
    differs from mmdd's (WBCE's log epsilon, pass 2's dropout), not the parity runs' replay of the official rounding
    (tesla_pass1_graph) or draws."""
    s = LORS
    method = [o for o in spec["mmdd"](s) if not o.startswith("method.tesla_pass1_graph")]
    common = [("hardware=gpu" if o == "hardware=cpu" and args.device == "cuda" else o)
              for o in mmdd_common(work, args.image_size, spec)]
    return [*common, f"method={spec['method']}", f"buffer_dir={inputs['store']}",
            f"method.iterations={iterations}", f"method.syn_steps={s['syn_steps']}",
            f"method.expert_epochs={s['expert_epochs']}", f"method.max_start_epoch={s['max_start_epoch']}",
            f"method.lr_img={s['lr_img']}", f"method.lr_txt={s['lr_txt']}", f"method.lr_lr={s['lr_lr']}",
            f"method.lr_init={s['lr_teacher']}",  # the official scripts start the step sizes at the teachers' lr
            f"method.batch_syn={s['mini_batch_size']}", "method.momentum=0.5", "method.lr_min=null",
            "method.loss_merge=separate", *method, "evaluate=false", "diagnostics_every=0", "save_every=0",
            "resume=false", f"hydra.run.dir={run_dir}"]


def mmdd_child(argv: list[str]) -> int:
    """`timing.py mmdd-child <out.json> <overrides>`: `mmdd distill` in this process, its last outer step under
    PyTorch's FLOP counter (a harness-side wrap, as official.py's for the official loop); the count into out.json."""
    from mmdd import cli
    from mmdd.bench.flops import OpCosts
    from mmdd.methods.engine.outer_loop import OuterLoopModule
    from mmdd.utils.io import atomic_write_json

    out, overrides = Path(argv[0]), argv[1:]
    step, counted = OuterLoopModule.training_step, {}

    def counting_step(self, batch, batch_idx):
        if self.global_step != self.settings.iterations - 1:
            return step(self, batch, batch_idx)
        with OpCosts() as costs:
            result = step(self, batch, batch_idx)
        counted.update(costs.record())
        return result

    OuterLoopModule.training_step = counting_step
    try:
        cli.main(["distill", *overrides])
    except SystemExit as stop:
        if stop.code:
            raise
    atomic_write_json(out, counted)
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "mmdd-child":
        return mmdd_child(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "table":  # `timing.py table <timing json>...`: the table of records
        print(markdown_table([json.loads(Path(f).read_text()) for f in sys.argv[2:]]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=TIMED_METHODS)
    parser.add_argument("--official", required=True, type=Path, help="a checkout of the method's official repository")
    parser.add_argument("--budget", type=int, default=100, help="pairs + 1 (S takes one pair's storage; default 100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per run (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first iterations per run (default 1)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--flops", action="store_true", help="also count each side's FLOPs per iteration")
    parser.add_argument("--port", action="store_true", help="also `mmdd bench` at the same settings: mmdd's port of "
                        "the reference loop against mmdd's path (its error against the official loop), and where "
                        "each one's time goes")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default outputs/parity/timing_...)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: both sides on the GPU (the official scripts as written, mmdd hardware=gpu)")
    parser.add_argument("--official-cpu-heap", choices=("os", "keep"), default="os",
                        help="the official process's allocator: os (default, as it runs anywhere) or keep (mmdd's "
                        "hardware.cpu_heap default, to tell the allocator's share of the ratio from the rest)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"change a shared setting on both sides (run.py's; default here: {STABLE})")
    args = parser.parse_args()
    LORS.update(STABLE)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in LORS:
            raise SystemExit(f"--set {item}: unknown setting {key!r}; one of {', '.join(LORS)}")
        LORS[key] = type(LORS[key])(value)
    official, spec = args.official.resolve(), METHODS[args.method]
    if not (official / spec["script"]).is_file():
        raise SystemExit(f"{official / spec['script']} not found: --official must be a checkout of the method's "
                         "repository (README.md)")
    LORS["num_queries"] = args.budget - 1
    # a training split with at least the budget's pairs (the official scripts draw them without replacement; mmdd
    # refuses a budget, S's pair included, above the training split)
    DATA["num_train"] = max(DATA["num_train"], args.budget)
    work = (args.work or REPO / "outputs" / "parity" /
            f"timing_{args.method}_{args.image_size}px_train{DATA['num_train']}").resolve()
    inputs = prepare(work, args.image_size, spec)
    saved = work / (f"timing_{args.budget}{'_official_keep' if args.official_cpu_heap == 'keep' else ''}"
                    f"{'_cuda' if args.device == 'cuda' else ''}.json")
    if args.rounds == 0:  # --rounds 0: the recorded rounds, with --flops / --port added
        if not saved.exists():
            raise SystemExit(f"--rounds 0 adds to a recorded timing, and {saved} does not exist")
        result = json.loads(saved.read_text())
    else:
        result = time_rounds(official, work, inputs, spec, args)
    med = result["sec_per_iter"]
    if args.flops:
        result.update(count_flops(official, work, inputs, spec, args))
    if args.port:
        result["port"] = bench_port(work, inputs, spec, args)
        print(f"port: {result['port']['sec_per_iter']['reference']:.3f} s/iter (official {med['official']:.3f}: "
              f"{result['port']['sec_per_iter']['reference'] / med['official'] - 1:+.0%}), mmdd's path in the same "
              f"process {result['port']['sec_per_iter']['ours']:.3f}")
    saved.write_text(json.dumps(result, indent=2))
    print(markdown_row(result))
    return 0


def time_rounds(official: Path, work: Path, inputs: dict, spec: dict, args) -> dict:
    """--rounds rounds of (the official run, then mmdd's), each iteration timed; the medians and per-round ratios."""
    total = args.warmup + args.iterations
    rounds = []
    for r in range(args.rounds):
        out = work / f"official_timing_{args.budget}_{r}"
        out.mkdir(parents=True, exist_ok=True)
        o = timed(official_cmd(official, work, inputs, spec, total, args, out, False),
                  work / f"official_timing_{args.budget}_{r}.log", env={"WANDB_MODE": "disabled"})
        recorded = json.loads((out / "timing.json").read_text())
        o["seconds"], o["cuda_peak_mb"] = recorded["seconds"], recorded.get("cuda_peak_mb")
        run_dir = work / "mmdd" / f"timing_{args.budget}_{r}"
        m = timed([sys.executable, "-m", "mmdd.cli", "distill",
                   *mmdd_overrides(work, inputs, spec, total, args, run_dir)],
                  work / f"mmdd_timing_{args.budget}_{r}.log")
        history = json.loads((run_dir / "synthetic" / "history.json").read_text())
        m["seconds"] = [h["distill/wall_sec_per_iter"] for h in history]
        if args.device == "cuda":  # the distillation's own peak allocated GPU memory
            m["cuda_peak_mb"] = max(h["distill/peak_mem_mb"] for h in history)
        if len(o["seconds"]) != total or len(m["seconds"]) != total:
            raise SystemExit(f"round {r}: {len(o['seconds'])} official and {len(m['seconds'])} mmdd iterations "
                             f"timed, expected {total} (see the logs in {work})")
        o_med = statistics.median(o["seconds"][args.warmup:])
        m_med = statistics.median(m["seconds"][args.warmup:])
        rounds.append({"official": o, "mmdd": m, "ratio": o_med / m_med})
        print(f"round {r}: official {o_med:.3f} s/iter, mmdd {m_med:.3f} s/iter, ratio {o_med / m_med:.2f}x "
              f"(peak RSS {o['peak_rss_mb']:.0f} / {m['peak_rss_mb']:.0f} MB)", flush=True)
    steady = {side: [s for r in rounds for s in r[side]["seconds"][args.warmup:]] for side in ("official", "mmdd")}
    med = {side: statistics.median(v) for side, v in steady.items()}
    return {
        "method": args.method, "budget": args.budget, "pairs": LORS["num_queries"], "image_size": args.image_size,
        "settings": dict(LORS), "data": dict(DATA), "official_commit": git_commit(official),
        "mmdd_commit": git_commit(REPO),  # the code timed (uncommitted edits not included)
        "official_cpu_heap": args.official_cpu_heap,
        "rounds": rounds, "sec_per_iter": med, "ratio": med["official"] / med["mmdd"],
        "round_ratios": [r["ratio"] for r in rounds],
        "peak_rss_mb": {side: max(r[side]["peak_rss_mb"] for r in rounds) for side in ("official", "mmdd")},
        "device": args.device,
        **({"cuda_peak_mb": {side: max(r[side]["cuda_peak_mb"] for r in rounds) for side in ("official", "mmdd")}}
           if args.device == "cuda" else {}),
        "threads": json.loads((work / f"official_timing_{args.budget}_0" / "timing.json").read_text())["threads"],
        "command": " ".join(["python", "experiments/parity/timing.py", *sys.argv[1:]]),
    }


def count_flops(official: Path, work: Path, inputs: dict, spec: dict, args) -> dict:
    """One untimed run per side, its last iteration's operations counted (FLOPs, bytes); the machine's matmul peak
    and copy bandwidth, measured here, and each side's roofline floor (mmdd.bench.flops)."""
    import torch

    from mmdd.bench.flops import floor, matmul_peak, memory_bandwidth

    out = work / f"official_flops_{args.budget}"
    out.mkdir(parents=True, exist_ok=True)
    timed(official_cmd(official, work, inputs, spec, 2, args, out, True),
          work / f"official_flops_{args.budget}.log", env={"WANDB_MODE": "disabled"})
    costs = {"official": json.loads((out / "timing.json").read_text())["op_costs"]}
    counted = work / f"mmdd_flops_{args.budget}.json"
    timed([sys.executable, __file__, "mmdd-child", str(counted),
           *mmdd_overrides(work, inputs, spec, 2, args, work / "mmdd" / f"flops_{args.budget}")],
          work / f"mmdd_flops_{args.budget}.log")
    costs["mmdd"] = json.loads(counted.read_text())
    device = torch.device(args.device)
    peak, bandwidth = matmul_peak(device), memory_bandwidth(device)
    return {"flops_per_iter": {side: c["flops"] for side, c in costs.items()},
            "bytes_per_iter": {side: c["bytes"] for side, c in costs.items()},
            "matmul_peak_flops": peak, "memory_bandwidth": bandwidth,
            "floor_seconds": {side: floor(c["ops"], peak, bandwidth) for side, c in costs.items()}}


def bench_port(work: Path, inputs: dict, spec: dict, args) -> dict:
    """`mmdd bench` at the timed settings (mmdd.bench: its port of the reference loop and mmdd's path, interleaved in
    one process, and where each one's time goes); its bench.json."""
    distill_only = ("evaluate=", "diagnostics_every=", "save_every=", "resume=", "method.iterations=", "hydra.run.dir=")
    run_dir = work / "mmdd" / f"bench_{args.budget}"
    overrides = [o for o in mmdd_overrides(work, inputs, spec, 1, args, run_dir)
                 if not o.startswith(distill_only)]
    timed([sys.executable, "-m", "mmdd.cli", "bench", *overrides, f"bench.iterations={args.iterations}",
           f"bench.warmup={args.warmup}", f"hydra.run.dir={run_dir}"], work / f"bench_{args.budget}.log")
    return json.loads((run_dir / "bench.json").read_text())


HEAD = ("| method | budget (pairs) | official s/iter | mmdd s/iter | ratio | per-round ratios | peak RSS MB official / "
        "mmdd | GFLOP/iter official / mmdd | of the matmul peak official / mmdd | mmdd at the peak, s/iter | "
        "GB moved/iter official / mmdd | floor s/iter official / mmdd (roofline) | each at its floor's |")


def markdown_table(results: list[dict]) -> str:
    """The recorded timings as one table (`timing.py table`); the allocator the official loop ran with is named
    where it is mmdd's (`--official-cpu-heap keep`)."""
    lines = [HEAD, "|" + "---|" * HEAD.count(" | ") + "---|"]
    for r in results:
        row = markdown_row(r)
        if r.get("official_cpu_heap") == "keep":
            row = row.replace(f"| {r['method']} |", f"| {r['method']} (official with cpu_heap keep) |", 1)
        lines.append(row + " |" * (HEAD.count(" | ") - row.count(" | ")))
    return "\n".join(lines)


def markdown_row(r: dict) -> str:
    rounds = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
    row = (f"| {r['method']} | {r['budget']} ({r['pairs']} pairs) | {r['sec_per_iter']['official']:.2f} | "
           f"{r['sec_per_iter']['mmdd']:.2f} | {r['ratio']:.2f}x | {rounds} | "
           f"{r['peak_rss_mb']['official']:.0f} / {r['peak_rss_mb']['mmdd']:.0f} |")
    if "flops_per_iter" in r:
        f, s, peak = r["flops_per_iter"], r["sec_per_iter"], r["matmul_peak_flops"]
        row += (f" {f['official'] / 1e9:.1f} / {f['mmdd'] / 1e9:.1f} | {f['official'] / s['official'] / peak:.0%} / "
                f"{f['mmdd'] / s['mmdd'] / peak:.0%} of {peak / 1e9:.0f} GFLOP/s | {f['mmdd'] / peak:.2f} |")
    if "floor_seconds" in r:  # records before issue 28's third session have FLOPs only
        b, fl, bw = r["bytes_per_iter"], r["floor_seconds"], r["memory_bandwidth"]
        o, m = fl["official"]["roofline"], fl["mmdd"]["roofline"]
        row += (f" {b['official'] / 1e9:.1f} / {b['mmdd'] / 1e9:.1f} (copy {bw / 1e9:.0f} GB/s) | {o:.2f} / {m:.2f} | "
                f"{o / s['official']:.0%} / {m / s['mmdd']:.0%} |")
    return row


if __name__ == "__main__":
    sys.exit(main())
