"""Investigation: is VCON's accuracy drop on Lite0 during the transition a running-statistics effect?

grid.py with one change: every in-training evaluation (the curve in ``history``) and the final
scores are also taken after re-estimating every BatchNorm's running statistics on training
batches (``--recal-batches`` batches of the run's batch size, fixed sampling seed, train-mode
forward without gradients, cumulative average; the statistics and the BatchNorm buffers are
restored afterwards, so training is exactly grid.py's). The recalibrated numbers go into each
``history`` point as ``val_acc_recal`` and into the result as ``<split>_acc_recal``.

If the curve's ``val_acc_recal`` stays high where ``val_acc`` falls, the drop during the transition
comes from running statistics that do not describe the blended network; if both fall, the blended
network itself is bad.

Example::

    python experiments/bn_recal.py --task lite0-fmnist --compressions lowrank --methods vcon,oneshot --seeds 1 \\
        --lr 1e-3 --transition 0.3 --both-splits --threads 1 --out experiments/logs/lite0-fmnist-bn-recal.jsonl
"""

import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grid  # noqa: E402

from vcon_kernels.tasks.base import Task  # noqa: E402

RECAL_BATCHES = 20
RECAL_SEED = 12345
_plain_evaluate = Task.evaluate


@torch.no_grad()
def recalibrated(task: Task, model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on training batches."""
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
    model.train()
    batches = task.train_batches(task.opt("batch_size"), RECAL_SEED)
    # train-mode forwards draw dropout masks: on a forked RNG, so that the run's own training
    # (its dropout masks) is exactly grid.py's
    with torch.random.fork_rng():
        for _ in range(RECAL_BATCHES):
            task.logits(model, next(batches))
    return model


def evaluate_both(self, model, split, batch_size=None, limit=None, progress=False):
    result = _plain_evaluate(self, model, split, batch_size, limit, progress)
    recal = _plain_evaluate(self, recalibrated(self, model), split, batch_size, limit, progress)
    result["acc_recal"], result["loss_recal"] = recal["acc"], recal["loss"]
    return result


# The runner copies "acc" / "loss" into the curve and the result; the recalibrated pair rides
# along through these two wrappers.
_finetune = grid.compress_run.__globals__["finetune"]


def finetune_with_recal(task, model, settings, seed, method=None, desc="train", progress=True):
    points = []
    original = task.evaluate

    def record(model_, split, **kw):
        ev = original(model_, split, **kw)
        points.append(ev)
        return ev

    task.evaluate = record
    try:
        run = _finetune(task, model, settings, seed, method=method, desc=desc, progress=progress)
    finally:
        del task.evaluate
    for point, ev in zip(run["history"], points):
        point["val_acc_recal"] = ev["acc_recal"]
    return run


def compress_run_with_recal(task, *args, **kwargs):
    result = _compress_run(task, *args, **kwargs)
    for split in kwargs.get("splits", ("test",)):
        ev = task.evaluate(result["model"], split)
        result[f"{split}_acc_recal"] = ev["acc_recal"]
    return result


Task.evaluate = evaluate_both
grid.compress_run.__globals__["finetune"] = finetune_with_recal
_compress_run = grid.compress_run
grid.compress_run = compress_run_with_recal

if __name__ == "__main__":
    if "--recal-batches" in sys.argv:
        i = sys.argv.index("--recal-batches")
        RECAL_BATCHES = int(sys.argv[i + 1])
        del sys.argv[i:i + 2]
    grid.main()
