#!/usr/bin/env bash
# Seconds per outer iteration of the learned methods, measured in one run on one machine (experiments/bench_methods.md):
#
#   bash experiments/bench_methods.sh [OUT [hydra overrides for every job ...]]
#
# Each (method, budget) distils ITERATIONS (default 30) iterations without evaluation, REPEATS times (default 2),
# the methods interleaved within each repeat so that a change in the machine's load hits all of them alike. The
# table gives each method's median s/iter over its repeats (each repeat's own median of its steady iterations), the
# ratio to LoRS at the same budget, and the setup time outside the iterations (e.g. MDM's k-means). It needs the
# stores compare_methods.sh builds (the default one, and teacher.init=shared for MDM).
set -euo pipefail
out=${1:-outputs/bench_methods}
shift || true
mmdd=${MMDD:-mmdd}
iterations=${ITERATIONS:-30}
repeats=${REPEATS:-2}
budgets=${BUDGETS:-100 200}
methods=${METHODS:-lors mdm dm tesla_vl}

for r in $(seq 1 "$repeats"); do
  for b in $budgets; do
    for m in $methods; do
      extra=()
      [ "$m" = mdm ] && extra=(teacher.init=shared)
      "$mmdd" distill method="$m" budget="$b" seed=0 evaluate=false resume=false method.iterations="$iterations" \
          save_every=0 "${extra[@]}" "$@" hydra.run.dir="$out/r$r/$m/b$b" > /dev/null
    done
  done
done

python3 - "$out" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
cells = {}
for manifest in sorted(out.glob("r*/*/b*/synthetic/manifest.json")):
    m = json.loads(manifest.read_text())
    stats = m["distill_stats"]
    cells.setdefault((m["budget"], m["method"]), []).append(
        (stats["sec_per_iter_median"], stats["total_seconds"] - stats["sec_per_iter_median"] * stats["iterations"],
         stats["cost"]["device"], stats.get("peak_mem_mb")))
# Peak memory: the accelerator's allocator peak, or on CPU the job's peak RSS (its own process: one job per run).
lines = ["| budget | method | s/iter (median over repeats) | vs LoRS | setup s (outside iterations) | repeats "
         "| peak memory per repeat | device |", "|---|---|---|---|---|---|---|---|"]
for (budget, method), runs in sorted(cells.items()):
    s = statistics.median(r[0] for r in runs)
    lors = cells.get((budget, "lors"))
    ratio = f"{s / statistics.median(r[0] for r in lors):.3f}" if lors else "–"
    setup = statistics.median(r[1] for r in runs)
    peaks = " / ".join("?" if r[3] is None else f"{r[3]:.0f}" for r in runs) + " MB"
    lines.append(f"| {budget} | {method} | {s:.3f} | {ratio} | {setup:.1f} | {len(runs)} | {peaks} | {runs[0][2]} |")
table = "\n".join(lines)
(out / "table.md").write_text(table + "\n")
print(table)
EOF
