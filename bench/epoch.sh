#!/usr/bin/env bash
# Wall time of one full multi-task epoch of train.py (summed losses and PCGrad) and of evaluating the whole dev set.
#   bash bench/epoch.sh [DATA_DIR] [extra train.py flags, e.g. --device cuda (bf16 autocast by default there)]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}
shift || true
mkdir -p runs
for mode in summed pcgrad; do
  flags=(); [ "$mode" = pcgrad ] && flags=(--pcgrad)
  /usr/bin/time -o "runs/bench-epoch-$mode.time" -f "$mode epoch: %e s wall, %M KB peak RSS" python train.py \
    --model minilm --data_dir "$data" --epochs 1 --output_dir "runs/bench-epoch-$mode" "${flags[@]}" "$@" \
    > "runs/bench-epoch-$mode.log" 2>&1
  cat "runs/bench-epoch-$mode.time"
  tail -n 1 "runs/bench-epoch-$mode/metrics.jsonl"
done
/usr/bin/time -f "dev evaluation: %e s wall, %M KB peak RSS" python evaluate.py runs/bench-epoch-summed/best \
  --data_dir "$data" --output_dir runs/bench-epoch-summed/predictions | tail -n 1
