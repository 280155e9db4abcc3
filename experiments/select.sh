#!/usr/bin/env bash
# Hyperparameter choice on the validation split (seed 0, prune 90%): learning rate, then transition length.
# Usage: experiments/select.sh minilm-rt "3e-5 1e-4" ; experiments/select.sh lite0-fmnist "2e-4 1e-3"
# Then, with the chosen LR: experiments/select.sh <task> <lr> "0.15 0.6"   (transition fractions)
set -euo pipefail
cd "$(dirname "$0")/.."
task=$1; lrs=$2; transitions=${3:-0.3}
for lr in $lrs; do
  for tr in $transitions; do
    methods=oneshot,gradual,vcon
    [ "$tr" != "0.3" ] && methods=gradual,vcon   # one-shot has no transition
    .venv/bin/python experiments/grid.py --task "$task" --compressions prune90 --methods $methods --seeds 0 \
      --lr "$lr" --transition "$tr" --val-only --threads 1 --out "experiments/logs/$task-select.jsonl"
  done
done
