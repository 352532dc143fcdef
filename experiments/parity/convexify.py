"""PTM-ST's shortcut trajectories against the official convexify.py: `python experiments/parity/convexify.py
--official <PTM-ST>`.

The official convexify.py (run unedited, in its own process) rewrites the LoRS parity run's replay buffers (the
experts of `mmdd buffer`, exported by run.py) into `convexified_<start>_<end>/`; mmdd computes the same shortcut on
the fly (`mmdd.methods.trajectory.shortcut.ConvexifiedSnapshots`, `method.convexify: {start, end}`). Every snapshot of every
expert is compared, per modality (max |a - b| / max |b|). Writes <work>/parity_convexify.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import convexified, git_commit, on_lors_run, relative  # noqa: E402


def main() -> int:
    def add_arguments(parser):
        parser.add_argument("--start", type=int, default=0)
        parser.add_argument("--end", type=int, default=None, help="default: every recorded snapshot")

    args, official, work, inputs = on_lors_run(__doc__, "PTM-ST", add_arguments)

    from mmdd.methods.trajectory.shortcut import ConvexifiedSnapshots, ConvexifySettings
    from mmdd.teachers.replay_buffer import read_replay_buffers
    from mmdd.teachers.trajectory_store import ExpertSnapshots, TrajectoryStore

    store = TrajectoryStore.open(inputs["store"])
    end = args.end or store.epochs + 1
    theirs = read_replay_buffers(convexified(official, work, inputs, args.start, end))

    reader = ConvexifiedSnapshots(ExpertSnapshots(store, store.param_names, store.completed_experts()),
                                  ConvexifySettings(start=args.start, end=end))
    largest, per = 0.0, []
    for expert, official_expert in enumerate(theirs):
        epochs = list(range(end - args.start))
        ours = reader.snapshots(expert, epochs)
        for t in epochs:
            for modality in ("image", "text"):
                b = torch.cat([p.reshape(-1).float() for p in official_expert[modality][t]])
                a = ours[t][modality]
                rel = relative(a, b)
                largest = max(largest, rel)
                per.append({"expert": expert, "snapshot": t, "modality": modality, "relative": rel})
    result = {"official_commit": git_commit(official), "start": args.start, "end": end, "largest": largest,
              "snapshots": per, "command": " ".join(["python", "experiments/parity/convexify.py", *sys.argv[1:]])}
    (work / "parity_convexify.json").write_text(json.dumps(result, indent=2))
    print(f"| PTM-ST | convexified trajectories ({len(theirs)} experts, snapshots {args.start}..{end - 1}) | "
          f"{largest:.1e} | {result['official_commit'][:7]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
