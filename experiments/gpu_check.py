"""One GPU, one call: does mmdd run there, how fast, how much memory, and does a resumed run end where a straight one
does? Made for a lent machine with the packages installed and no network (under 8 minutes on one H100):

    python experiments/gpu_check.py --out outputs/gpu_check            # 224 px, budget 100, 3 iterations
    python experiments/gpu_check.py --out /tmp/gpu_check --cpu --image-size 32 --iterations 1 --syn-steps 2
                                                                       # the CPU smoke test (tests/, slow suite)

What it runs, on the papers' model (nfnet_l0 with random weights, model.image.pretrained=false, and a random 768-d
BERT stand-in, so nothing is downloaded) and the generated dataset at --image-size:
1. the device and library versions;
2. `mmdd buffer` for RepBlend's model (frozen nfnet_l0, heads train) and LoRS's (all of nfnet_l0 trains): 2 experts;
3. `mmdd distill` end to end for RepBlend and LoRS at --budget, --iterations iterations, in three numerics:
   fp32 (hardware.tf32=false: full fp32), fp32+TF32 (hardware.tf32=true) and bf16 (hardware.precision=bf16-mixed with
   channels-last), and fp32 with TESLA's second pass in forward mode (method.tesla_pass2=forward); s/iter (median),
   peak allocated and reserved memory, from each set's manifest;
4. `mmdd bench` for the same cells (but the forward-mode one): mmdd's path against the port of the reference loop, interleaved, with the
   largest relative gradient difference between the two paths (what TF32 and bf16 do to gradient agreement);
5. resume: LoRS fp32 for 2 iterations, extended to 4 in the same run directory, against a straight 4 (bit for bit,
   or the largest difference; cuDNN picks algorithms per run unless hardware.deterministic=true);
6. with --official-repblend / --official-lors (checkouts of the official code, outside this repository): the official
   loop against `mmdd distill` (experiments/parity/timing.py --device cuda, one round of --iterations after one
   warm-up) at --image-size: RepBlend at 99 and 499 pairs, LoRS at 99, fp32, with each side's peak allocated memory.
Writes gpu_check.md (the tables) and gpu_check.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MODELS = {"repblend": "nfnet_bert_heads", "lors": "nfnet_bert"}
# name -> hardware overrides: full fp32, fp32 with TF32 tensor cores, bf16 autocast (fp32 set, step sizes, S)
NUMERICS = {
    "fp32": ["hardware.precision=32-true", "hardware.tf32=false"],
    "fp32+tf32": ["hardware.precision=32-true", "hardware.tf32=true"],
    "bf16": ["hardware.precision=bf16-mixed", "hardware.tf32=false", "hardware.channels_last=true"],
    # TESLA's second pass in forward mode (method.tesla_pass2=forward): on the CPU it costs what double backward
    # costs (experiments/bench.md); on a GPU unmeasured. A distill cell only, compared with the fp32 row.
    "fp32-fwd": ["hardware.precision=32-true", "hardware.tf32=false", "method.tesla_pass2=forward"],
}
BENCHED = ("fp32", "fp32+tf32", "bf16")  # the numerics whose `mmdd bench` cells run (mmdd's path vs the port)


def versions() -> dict:
    import lightning
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", devices=torch.cuda.device_count())
    else:
        info.update(device=f"cpu ({os.cpu_count()} cores)")
    return info


class Runner:
    """`mmdd <stage>` in a subprocess under --out, with the common overrides."""

    def __init__(self, args, out: Path, text: Path):
        self.out, self.log = out, out / "commands.log"
        self.common = [
            f"data.image_size={args.image_size}", f"data.generate.num_train={args.num_train}",
            "data.generate.num_val=20", "data.generate.num_test=20", "model.image.pretrained=false",
            f"model.text.name_or_path={text}", "teacher.num_experts=2", f"teacher.epochs={args.teacher_epochs}",
            "teacher.batch_size=20", f"method.syn_steps={args.syn_steps}", "method.batch_syn=20",
            "method.expert_epochs=1", "method.max_start_epoch=1", f"budget={args.budget}", "logger=none",
            f"hardware={'cpu' if args.cpu else 'gpu'}",
        ]

    def __call__(self, stage: str, name: str, *overrides: str, timeout: int = 900) -> tuple[Path, float]:
        run_dir = self.out / "runs" / name
        cmd = [sys.executable, "-m", "mmdd.cli", stage, *self.common, *overrides, f"hydra.run.dir={run_dir}"]
        env = {**os.environ, "MMDD_ROOT": str(self.out), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=self.out, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
        with open(self.log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n# exit {proc.returncode} after {seconds:.1f} s\n")
        if proc.returncode != 0:
            raise SystemExit(f"gpu_check: `mmdd {stage}` ({name}) failed with exit {proc.returncode}:\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return run_dir, seconds


def method_args(method: str) -> list[str]:
    return [f"method={method}", f"model={MODELS[method]}"]


def distill_cell(run: Runner, method: str, numerics: str, iterations: int) -> dict:
    run_dir, seconds = run("distill", f"distill_{method}_{numerics}", *method_args(method), *NUMERICS[numerics],
                           f"method.iterations={iterations}", "evaluate=false", "save_every=0")
    manifest = json.loads((run_dir / "synthetic" / "manifest.json").read_text())
    stats = manifest["distill_stats"]
    return {"method": method, "numerics": numerics, "iterations": stats["iterations"],
            "sec_per_iter": stats["sec_per_iter_median"], "peak_allocated_mb": stats["peak_mem_mb"],
            "peak_reserved_mb": stats.get("peak_reserved_mb"), "process_seconds": seconds,
            "hardware": manifest.get("hardware")}


def bench_cell(run: Runner, method: str, numerics: str, iterations: int) -> dict:
    run_dir, _ = run("bench", f"bench_{method}_{numerics}", *method_args(method), *NUMERICS[numerics],
                     f"bench.iterations={iterations}", "bench.warmup=1")
    b = json.loads((run_dir / "bench.json").read_text())
    return {"method": method, "numerics": numerics, "sec_per_iter_mmdd": b["sec_per_iter"]["ours"],
            "sec_per_iter_reference": b["sec_per_iter"]["reference"], "speedup": b["speedup"],
            "peak_mb_mmdd": b["peak_mem_mb"]["ours"], "peak_mb_reference": b["peak_mem_mb"]["reference"],
            "reserved_mb_mmdd": (b.get("peak_reserved_mb") or {}).get("ours"),
            "grad_max_rel_diff": b["grad_max_rel_diff"]}


def resume_check(run: Runner) -> dict:
    """LoRS fp32: 2 iterations then extended to 4 in the same directory, against 4 straight."""
    from safetensors.torch import load_file

    args = [*method_args("lors"), *NUMERICS["fp32"], "evaluate=false", "save_every=0"]
    straight, _ = run("distill", "resume_straight", *args, "method.iterations=4")
    run("distill", "resume_split", *args, "method.iterations=2")
    split, _ = run("distill", "resume_split", *args, "method.iterations=4")
    a, b = (load_file(str(d / "synthetic" / "synthetic.safetensors")) for d in (straight, split))
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}
    return {"bit_identical": all(v == 0.0 for v in diffs.values()), "max_abs_diff": max(diffs.values()),
            "tensors": sorted(a)}


OFFICIAL_CELLS = (("repblend", 100), ("repblend", 500), ("lors", 100))  # (method, budget): S takes one pair


def official_cell(args, out: Path, method: str, budget: int, checkout: str) -> dict:
    """experiments/parity/timing.py: the official loop and `mmdd distill`, one round, on this machine's device."""
    timing = Path(__file__).resolve().parent / "parity" / "timing.py"
    work = out / "official" / f"{method}_{args.image_size}px_b{budget}"
    cmd = [sys.executable, str(timing), method, "--official", checkout, "--budget", str(budget), "--rounds", "1",
           "--iterations", str(args.iterations), "--warmup", "1", "--image-size", str(args.image_size),
           "--device", "cpu" if args.cpu else "cuda", "--work", str(work)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    with open(out / "commands.log", "a") as f:
        f.write(f"$ {' '.join(cmd)}\n# exit {proc.returncode} after {time.perf_counter() - t0:.1f} s\n")
    if proc.returncode != 0:
        raise SystemExit(f"gpu_check: timing.py {method} {budget} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    r = json.loads((work / f"timing_{budget}{'' if args.cpu else '_cuda'}.json").read_text())
    peaks = r.get("cuda_peak_mb") or r["peak_rss_mb"]
    return {"method": method, "budget": budget, "pairs": r["pairs"], "official_sec_per_iter": r["sec_per_iter"]["official"],
            "mmdd_sec_per_iter": r["sec_per_iter"]["mmdd"], "ratio": r["ratio"], "peak_mb_official": peaks["official"],
            "peak_mb_mmdd": peaks["mmdd"], "official_commit": r["official_commit"]}


def fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 else f"{v:.{digits}f}"
    return str(v)


def report(info: dict, args, teachers: dict, distill: list[dict], bench: list[dict], resume: dict | None,
           seconds: float, official: list[dict] | None = None) -> str:
    from mmdd.report.table import markdown_grid

    lines = [f"## GPU check: {info.get('device')} ({time.strftime('%Y-%m-%d')})", "",
             "```bash", f"python experiments/gpu_check.py {' '.join(sys.argv[1:])}", "```", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "device") + ".",
             f"Cells: nfnet_l0 (random weights) + 768-d BERT stand-in, {args.image_size} px, budget {args.budget}, "
             f"syn_steps {args.syn_steps}, mini-batches of 20, {args.iterations} iterations (s/iter: median). "
             f"Teachers: {', '.join(f'{m} {s:.0f} s' for m, s in teachers.items())} (2 experts x "
             f"{args.teacher_epochs} epochs, process time). Whole check: {seconds:.0f} s.", "",
             "### `mmdd distill` end to end", "",
             markdown_grid(["method", "numerics", "s/iter", "peak allocated MB (CPU: RSS)", "peak reserved MB",
                              "process s"],
                             [[r["method"], r["numerics"], fmt(r["sec_per_iter"]), fmt(r["peak_allocated_mb"], 0),
                               fmt(r["peak_reserved_mb"], 0), fmt(r["process_seconds"], 0)] for r in distill]),
             "", "### `mmdd bench` (mmdd's path vs the port of the reference loop, interleaved)", "",
             markdown_grid(["method", "numerics", "s/iter mmdd", "s/iter reference", "speedup", "peak MB mmdd",
                              "peak MB reference", "reserved MB mmdd", "max rel. grad diff"],
                             [[r["method"], r["numerics"], fmt(r["sec_per_iter_mmdd"]),
                               fmt(r["sec_per_iter_reference"]), f"{r['speedup']:.2f}x", fmt(r["peak_mb_mmdd"], 0),
                               fmt(r["peak_mb_reference"], 0), fmt(r["reserved_mb_mmdd"], 0),
                               f"{r['grad_max_rel_diff']:.1e}"] for r in bench])]
    if official:
        lines += ["", "### Against the official loops (experiments/parity/timing.py, fp32, one round)", "",
                  markdown_grid(["method", "budget (pairs)", "official s/iter", "mmdd s/iter", "ratio",
                                   "peak MB official", "peak MB mmdd (GPU: allocated; CPU: RSS)", "official commit"],
                                  [[r["method"], f"{r['budget']} ({r['pairs']})", fmt(r["official_sec_per_iter"]),
                                    fmt(r["mmdd_sec_per_iter"]), f"{r['ratio']:.2f}x", fmt(r["peak_mb_official"], 0),
                                    fmt(r["peak_mb_mmdd"], 0), r["official_commit"][:7]] for r in official])]
    if resume is not None:
        lines += ["", "### Resume (LoRS fp32, one process): 2 iterations extended to 4 vs 4 straight", "",
                  ("bit-identical" if resume["bit_identical"] else
                   f"not bit-identical: largest difference {resume['max_abs_diff']:.2e}") +
                  f" over {', '.join(resume['tensors'])}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--syn-steps", type=int, default=8)
    ap.add_argument("--num-train", type=int, default=200)
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--numerics", nargs="+", default=list(NUMERICS), choices=list(NUMERICS))
    ap.add_argument("--no-bench", action="store_true", help="skip the `mmdd bench` cells")
    ap.add_argument("--no-resume", action="store_true", help="skip the resume check")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (the smoke test of this script)")
    ap.add_argument("--official-repblend", default=None, help="a RepBlend checkout: time its loop against mmdd's")
    ap.add_argument("--official-lors", default=None, help="a LoRS_Distill checkout: time its loop against mmdd's")
    args = ap.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); --cpu runs the "
                         "script's smoke test on the CPU")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = versions()
    print(json.dumps(info), flush=True)
    from mmdd.bench.standin import write_bert_standin

    text = out / "bert768"
    if not (text / "config.json").exists():
        write_bert_standin(text)
    run = Runner(args, out, text)
    teachers = {}
    for method in args.methods:
        _, teachers[method] = run("buffer", f"buffer_{method}", f"model={MODELS[method]}")
        print(f"teachers for {method}: {teachers[method]:.0f} s", flush=True)
    distill, bench = [], []
    for method in args.methods:
        for numerics in args.numerics:
            distill.append(distill_cell(run, method, numerics, args.iterations))
            print(json.dumps(distill[-1]), flush=True)
            if not args.no_bench and numerics in BENCHED:
                bench.append(bench_cell(run, method, numerics, args.iterations))
                print(json.dumps(bench[-1]), flush=True)
    resume = None if args.no_resume or "lors" not in args.methods else resume_check(run)
    checkouts = {"repblend": args.official_repblend, "lors": args.official_lors}
    official = []
    for method, budget in OFFICIAL_CELLS:
        if checkouts[method]:
            official.append(official_cell(args, out, method, budget, checkouts[method]))
            print(json.dumps(official[-1]), flush=True)
    seconds = time.perf_counter() - started
    text_report = report(info, args, teachers, distill, bench, resume, seconds, official)
    results = {"versions": info, "args": vars(args), "teachers_seconds": teachers, "distill": distill,
               "bench": bench, "resume": resume, "official": official, "seconds": seconds}
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "gpu_check.md").write_text(text_report)
    print(text_report)


if __name__ == "__main__":
    main()
