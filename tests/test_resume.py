"""Checkpoint in the middle of the transition, resume in a fresh process: bit-identical to no interruption.

Three legs (``resume_worker.py``): an uninterrupted run and a run that stops after STOP
optimizer steps (every stage mid-transition) and saves model + optimizer + LR scheduler +
VCON scheduler + RNG state, both in the test process; then a fresh process that builds the
model from another seed, loads that checkpoint and continues. The loss sequence, the layer state before every step
(beta, keep-masks, the frozen ``update="once"`` mask, the every-2-steps mask, thresholds and
quantization scales) and the final state dict must equal the uninterrupted run bit for bit.
"""

import os
import subprocess
import sys

import pytest
import resume_worker
import torch
from training_setup import STEPS
from training_setup import WINDOWS

WORKER = os.path.join(os.path.dirname(__file__), "resume_worker.py")
STOP = 3


def assert_states_identical(a, b, where):
    assert a.keys() == b.keys(), where
    for name in a:
        assert a[name].keys() == b[name].keys(), (where, name)
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{where}: layer {name} {key} differs"


def _in_process(*args):
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            resume_worker.main(*map(str, args))
    finally:
        torch.set_num_threads(threads)


def _in_fresh_process(*args):
    proc = subprocess.run([sys.executable, WORKER, *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=240)
    assert proc.returncode == 0, proc.stdout.decode()


@pytest.mark.slow
def test_resume_in_fresh_process_is_bit_identical(tmp_path):
    full, first, second, ckpt = (tmp_path / n for n in ("full.pt", "first.pt", "second.pt", "ckpt.pt"))
    _in_process("full", full)
    _in_process("first", first, ckpt, STOP)
    _in_fresh_process("second", second, ckpt, STOP)
    ref, a, b = (torch.load(p) for p in (full, first, second))

    # Interrupted mid-transition: every stage has 0 < beta < 1 at the checkpoint.
    for stage, (begin, end) in WINDOWS.items():
        assert begin < STOP < end, stage
    assert b["t"] == ref["t"] == STEPS

    # The fresh model differs before loading (its own seed): the checkpoint restores all of it.
    fresh, saved = b["before_load"], a["states"][-1]
    assert not torch.equal(fresh["7"]["mask"], saved["7"]["mask"]), "update='once' mask would not be tested"
    assert not torch.equal(fresh["3"]["scales"], saved["3"]["scales"])
    assert_states_identical(b["states"][0], saved, "right after loading")

    assert a["losses"] + b["losses"] == ref["losses"]
    for step, (got, want) in enumerate(zip(a["states"][:-1] + b["states"], ref["states"])):
        assert_states_identical(got, want, f"before step {step}")
    assert b["final"].keys() == ref["final"].keys()
    for key, value in ref["final"].items():
        assert torch.equal(b["final"][key], value), key
