"""What every demo task provides: data splits, a pretrained dense model, and which layers to compress.

A task owns three splits (``train``, ``val``, ``test``), each a dict of equally long tensors
with a ``"labels"`` entry, kept on the CPU. The runner (``vcon_kernels.comparison``) only
calls the methods below, so a new task is one small subclass.

Splits are fixed by the task (a fixed data seed, independent of the run seed), so every
method and every seed sees the same train/val/test examples; the run seed changes the
head initialisation of the dense model and the order of the training batches.

Example usage::

    from vcon_kernels.tasks import get_task
    task = get_task("digits-mlp")
    task.load()
    model = task.build_model(seed=0)
    print(task.evaluate(model, "val"))
"""

from __future__ import annotations

from typing import Callable
from typing import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import vcon_kernels as vk

Batch = dict


class Task:
    """Base class of the demo tasks (see the module docstring)."""

    name = "task"
    title = "task"
    # Hyperparameters of the run, overridable from the command line.
    defaults: dict = {}
    # Whether build_model starts from pretrained weights (False: a random init that only the dense
    # phase trains, so the paper's "compress the pretrained model while learning the task" has no meaning).
    pretrained = True

    def __init__(self, device: str = "cpu", **options):
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise ValueError(f"task {self.name!r} has no options {sorted(unknown)}; known: {sorted(self.defaults)}")
        self.options = {**self.defaults, **{k: v for k, v in options.items() if v is not None}}
        self.device = torch.device(device)
        self.splits: dict = {}

    # -- to implement -------------------------------------------------------------------------------
    def load(self) -> None:
        """Fill ``self.splits`` (``train``/``val``/``test``: dicts of CPU tensors with ``labels``)."""
        raise NotImplementedError

    def build_model(self, seed: int) -> nn.Module:
        """The dense model (pretrained body, new head initialised from ``seed``), on ``self.device``."""
        raise NotImplementedError

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Class logits for a batch already on the device."""
        raise NotImplementedError

    def compress_filter(self, config: vk.VCONConfig) -> Callable[[nn.Module, str], bool]:
        """``filter_fn`` for ``vk.convert``: which layers this config compresses."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line: model, data, subset sizes and input size (printed with the results)."""
        raise NotImplementedError

    # -- shared machinery ------------------------------------------------------------------------------
    def opt(self, key: str):
        return self.options[key]

    def size(self, split: str) -> int:
        return len(self.splits[split]["labels"])

    def to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def batch(self, split: str, index: torch.Tensor) -> Batch:
        return self.to_device({k: v[index] for k, v in self.splits[split].items()})

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """Endless shuffled mini-batches of the train split (reshuffled every epoch, from ``seed``)."""
        n = self.size("train")
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n - batch_size + 1, batch_size):
                yield self.batch("train", order[start:start + batch_size])

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: Optional[int] = None,
                 limit: Optional[int] = None, progress: bool = False) -> dict:
        """``{"acc": accuracy, "loss": mean cross-entropy}`` on ``split`` (its first ``limit`` examples)."""
        was_training = model.training
        model.eval()
        n = self.size(split) if limit is None else min(limit, self.size(split))
        bs = batch_size or self.opt("eval_batch_size")
        correct, total_loss = 0, 0.0
        starts = range(0, n, bs)
        if progress:
            starts = tqdm(starts, desc=f"evaluate {split}", leave=False, unit="batch")
        for start in starts:
            batch = self.batch(split, torch.arange(start, min(start + bs, n)))
            logits = self.logits(model, batch).float()
            total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        model.train(was_training)
        return {"acc": correct / n, "loss": total_loss / n}


def subset(n_total: int, size: Optional[int], seed: int) -> torch.Tensor:
    """A fixed random subset of ``range(n_total)`` of ``size`` entries (all of them when size is 0/None)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_total, generator=gen)
    if not size or size >= n_total:
        return order
    return order[:size]


__all__ = ["Batch", "Task", "subset"]
