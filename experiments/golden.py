"""The golden harness: does a change that should not change numbers leave every method's output as it was?

Runs one tiny distillation of every method config (conf/method/*.yaml, RepBlend through its experiment), each with
one student, and a tiny `mmdd run` (the quick start's stages: teachers, distillation, students, table), all on the
generated dataset, and records for each row the SHA-256 of the set's tensors and captions, its identities (the
manifest's data and model identity, the run's config hash, the identity its checkpoint holds; a phased set's earlier
phases likewise) and the student's test metrics. `--against` compares with an earlier record and exits 1 on any
difference. To record the code before a change, run this script with the old code first on the path (a git worktree:
`PYTHONPATH=<worktree>/src python experiments/golden.py ...`):

    python experiments/golden.py --root /tmp/golden --out /tmp/golden_before.json
    ... change the code ...
    python experiments/golden.py --root /tmp/golden --out /tmp/golden_after.json --against /tmp/golden_before.json

The root is emptied first; give records you compare the same root (configs and identities hold absolute paths).

CPU float arithmetic is reproducible on one machine with one torch build and thread count (the harness pins one
thread), not across machines: compare records made on the same box. About 2.5 minutes on the 2-core CPU box
(2026-12-07).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

# conf/debug/tiny.yaml (the tests' tiny run: 64/16/24 images, a width-8 ConvNet, 2 teachers x 3 epochs, budget 8,
# 4-epoch students) with one student per set, no logger and one thread
PRETRAIN = ["pretrain.epochs=2", "pretrain.batch_size=16"]  # RepBlend's frozen backbone (its path names the epochs)
COMMON = ["debug=tiny", "protocol.num_seeds=1", *PRETRAIN, "logger=none", "hardware.num_threads=1"]
MATCHING = ["method.iterations=3", "method.syn_steps=2"]

# row -> the distillation's own overrides (the store each row reads is chosen by its model)
ROWS = {
    "mtt_vl": ["method=mtt_vl", *MATCHING],
    "tesla_vl": ["method=tesla_vl", *MATCHING],
    "lors": ["method=lors", *MATCHING, "method.similarity.rank=2"],
    "repblend": ["experiment=synscenes_repblend", *MATCHING],
    "ptm_st": ["method=ptm_st", "method.convexify.end=4", "method.iterations=3",
               "method.phases=[{pairs: 3, min_start_epoch: 0, max_start_epoch: 1}, "
               "{pairs: 4, min_start_epoch: 1, max_start_epoch: 2, iterations: 2}]"],
    "dm": ["method=dm", "method.iterations=4", "method.real_batch=16"],
    "mdm": ["method=mdm", "method.iterations=4", "method.syn_batch=4", "method.real_batch=16"],
    "pds": ["method=pds", "method.restarts=2"],
    "random": ["method=random"],
    "herding": ["method=herding"],
    "kcenter": ["method=kcenter"],
    "forgetting": ["method=forgetting"],
}


def mmdd(args: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MMDD_ROOT": str(root),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mmdd.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"mmdd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def record_set(run: Path) -> dict:
    syn = run / "synthetic"
    manifest = json.loads((syn / "manifest.json").read_text())
    results = json.loads((run / "results.json").read_text())
    record = {"tensors": sha256(syn / "synthetic.safetensors"), "captions": sha256(syn / "captions.json"),
              "config_hash": manifest.get("config_hash"), "identity": digest(manifest.get("identity")),
              "num_pairs": manifest.get("num_pairs"),
              "students": [{"seed": s["seed"], "test": s["test"]} for s in results["seeds"]]}
    # what a checkpoint of the run may resume into (mmdd.identity.distill_identity, held in the checkpoint)
    ckpt = syn / "checkpoint" / "last.ckpt"
    if ckpt.exists():
        record["checkpoint_identity"] = digest(torch.load(ckpt, map_location="cpu", weights_only=True)["mmdd"]["identity"])
    # a phased set's earlier phases: their sets, identities and config hashes
    if manifest.get("earlier_phases"):
        record["earlier_phase_identities"] = manifest.get("earlier_phase_identities")
        for name in manifest["earlier_phases"]:
            phase = json.loads((syn / name / "manifest.json").read_text())
            record[name] = {"tensors": sha256(syn / name / "synthetic.safetensors"),
                            "config_hash": phase.get("config_hash"), "phase_identity": phase.get("phase_identity"),
                            "checkpoint_identity": digest(torch.load(syn / name / "checkpoint" / "last.ckpt",
                                                                     map_location="cpu", weights_only=True)
                                                          ["mmdd"]["identity"])}
    return record


def run_all(root: Path, rows: list[str]) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out: dict = {}
    t0 = time.perf_counter()
    for model in ("convnet_minilm", "convnet_heads"):
        if model == "convnet_heads":  # RepBlend's frozen backbone, pre-trained on the same data
            mmdd(["pretrain", *COMMON, "hydra.run.dir=outputs/pretrain"], root)
        mmdd(["buffer", *COMMON, f"model={model}", f"hydra.run.dir=outputs/buffer_{model}"], root)
    for row in rows:
        mmdd(["distill", *COMMON, *ROWS[row], "evaluate=true", f"hydra.run.dir=outputs/{row}"], root)
        out[row] = record_set(root / "outputs" / row)
        print(f"{row}: {out[row]['tensors'][:12]} r_mean {out[row]['students'][0]['test'].get('r_mean')} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    # the quick start's stages in one `mmdd run` (its own teachers, distillation, students and table)
    proc = mmdd(["run", *COMMON, *MATCHING, "hydra.run.dir=outputs/quickstart"], root)
    quick = root / "outputs" / "quickstart"
    table = quick / "table.md"
    out["quickstart"] = {"table": table.read_text() if table.exists() else proc.stdout.split("| method |", 1)[-1]}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def differences(now: dict, before: dict) -> list[str]:
    found = []
    for row in sorted((set(now) | set(before)) - {"seconds"}):
        if row not in now or row not in before:
            found.append(f"{row}: only in {'the new' if row in now else 'the earlier'} record")
        elif now[row] != before[row]:
            keys = [k for k in sorted(set(now[row]) | set(before[row])) if now[row].get(k) != before[row].get(k)]
            found.append(f"{row}: {', '.join(keys)} differ")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the working folder for the runs (emptied first)")
    parser.add_argument("--out", type=Path, required=True, help="the record (JSON) to write")
    parser.add_argument("--against", type=Path, help="an earlier record: exit 1 where this one differs")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    args = parser.parse_args()
    record = run_all(args.root.resolve(), args.rows)
    args.out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"record written to {args.out} ({record['seconds']} s)")
    if args.against:
        found = differences(record, json.loads(args.against.read_text()))
        print("\n".join(found) if found else f"identical to {args.against}: every set, identity and student")
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
