"""A 4-layer MLP on scikit-learn's bundled 8x8 digits: a seconds-long task for smoke tests.

No pretrained model exists for it, so the "dense model" is trained from scratch by the
dense phase of the run (``dense_steps``), then compressed like the real tasks. It needs
only scikit-learn (a test dependency), so the CLI tests exercise the whole pipeline with
it. The hidden layers are compressed; the output layer stays dense.

Splits: a fixed shuffle of the 1,797 images: 1,100 train, 300 validation, 397 test.
"""

from __future__ import annotations

import torch
from torch import nn

from ..integrations.deps import require
from .base import Task

DATA_SEED = 0


class DigitsMLP(Task):
    name = "digits-mlp"
    title = "MLP on scikit-learn digits"
    pretrained = False
    defaults = dict(
        hidden=256,
        batch_size=64,
        eval_batch_size=512,
        dense_steps=400,
        dense_lr=3e-3,
        steps=200,
        lr=1e-3,
        warmup=0.0,
        clip=1.0,
        eval_every=20,
        eval_size=300,
    )

    def load(self) -> None:
        data = require("sklearn", "digits-mlp").datasets.load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(DATA_SEED))
        cuts = {"train": order[:1100], "val": order[1100:1400], "test": order[1400:]}
        self.splits = {k: {"x": x[i], "labels": y[i]} for k, i in cuts.items()}

    def build_model(self, seed: int):
        torch.manual_seed(seed)
        h = self.opt("hidden")
        model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                              nn.Linear(h, 10))
        return model.to(self.device)

    def logits(self, model, batch):
        return model(batch["x"])

    def compress_filter(self, config):
        return lambda module, name: name != "6"

    def describe(self) -> str:
        return (f"{self.title}: train {self.size('train')} / val {self.size('val')} / test {self.size('test')} "
                "images, 3 hidden layers compressed, output layer dense")


__all__ = ["DigitsMLP"]
