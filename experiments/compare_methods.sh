#!/usr/bin/env bash
# Every method on the embedded dataset, as Hydra multiruns and one table (experiments/methods_comparison.md):
#
#   bash experiments/compare_methods.sh [OUT [hydra overrides for every stage ...]]
#
# OUT (default outputs/compare) receives one multirun folder per model, and table.md. Overrides after OUT apply
# to every command (e.g. data.generate.num_train=... for a smaller run); LEARNED="method.iterations=3 ..." adds
# overrides for the learned methods only (coresets have no iterations). BUDGETS (default "100,200") and SEEDS
# (default 0) are the grid. The rows are told apart by `mmdd table`'s variant column (model=convnet_heads for the
# frozen, pre-trained ConvNet; RepBlend is a frozen-backbone method, compared with the coresets on that model).
set -euo pipefail
out=${1:-outputs/compare}
shift || true
mmdd=${MMDD:-mmdd}
budgets=${BUDGETS:-100,200}
seeds=${SEEDS:-0}
read -r -a learned <<< "${LEARNED:-}"
coresets=random,herding,kcenter,forgetting

"$mmdd" buffer "$@" hydra.run.dir="$out/stages/buffer"
"$mmdd" pretrain "$@" hydra.run.dir="$out/stages/pretrain"
"$mmdd" buffer model=convnet_heads "$@" hydra.run.dir="$out/stages/buffer_heads"

"$mmdd" distill -m method=$coresets budget=$budgets seed=$seeds "$@" hydra.sweep.dir="$out/coresets"
"$mmdd" distill -m method=mtt_vl,tesla_vl,lors budget=$budgets seed=$seeds "$@" "${learned[@]}" \
    hydra.sweep.dir="$out/learned"
"$mmdd" distill -m model=convnet_heads method=$coresets budget=$budgets seed=$seeds "$@" \
    hydra.sweep.dir="$out/coresets_heads"
"$mmdd" distill -m experiment=synscenes_repblend budget=$budgets seed=$seeds "$@" "${learned[@]}" \
    hydra.sweep.dir="$out/repblend_heads"

"$mmdd" table "$out" -o "$out/table.md"
