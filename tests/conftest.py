import os
import sys

import torch

# Triton kernels are interpreted on CPU-only machines. The variable must be set before
# any kernel module is imported (whether a kernel is interpreted is fixed when
# @triton.jit runs), so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

# Tests run in parallel workers (pytest -n 2) on 2 cores, and tensors here are tiny: one
# intra-op thread per worker avoids oversubscription, which made small ops 10x slower.
torch.set_num_threads(1)
