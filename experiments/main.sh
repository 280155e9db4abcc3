#!/usr/bin/env bash
# The main grid: 4 compressions x {one-shot, gradual, VCON} x seeds 0,1,2, scored on the test split, with
# the learning rate and the transition lengths (fractions of the steps) chosen on the validation split.
# Usage: experiments/main.sh minilm-rt 3e-4 0.6 0.6 ; experiments/main.sh lite0-fmnist 1e-3 0.15 0.3
set -euo pipefail
cd "$(dirname "$0")/.."
task=$1; lr=$2; gradual=$3; vcon=$4
.venv/bin/python experiments/grid.py --task "$task" --lr "$lr" --transition-for "gradual=$gradual,vcon=$vcon" \
  --seeds 0,1,2 --compressions prune90,binary,int4,lowrank --methods oneshot,gradual,vcon --threads 1 \
  --out "experiments/logs/$task-main.jsonl"
