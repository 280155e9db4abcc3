"""Investigation: grid.py with every BatchNorm frozen (running statistics used and never updated).

Tests the BatchNorm hypothesis of experiments/RESULTS.md: if VCON's collapse on Lite0 comes from
BatchNorm renormalizing the blend in train mode, freezing the statistics of the dense model should
remove the train/eval gap during the transition. Same arguments as grid.py; use a separate --out
(grid.py's resume key does not include this patch).

Example::

    python experiments/frozen_bn.py --task lite0-fmnist --compressions lowrank --methods vcon,oneshot \\
        --seeds 0 --lr 1e-3 --transition 0.3 --val-only --threads 1 --out experiments/logs/lite0-fmnist-frozenbn.jsonl
"""

import os
import sys

import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _frozen_forward(self, x):
    # eval-mode batch norm in every mode: the dense model's running statistics, no update
    return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


nn.BatchNorm2d.forward = _frozen_forward

import grid  # noqa: E402

if __name__ == "__main__":
    grid.main()
