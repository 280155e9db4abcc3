"""VCON x BatchNorm on a small BatchNorm CNN: one-shot vs VCON with one shared BatchNorm vs a BatchNorm per path.

The network and the training are those of tests/test_batchnorm.py (3 convs of 32 channels, each
followed by BatchNorm, on scikit-learn's 8x8 digits: 1,300 train / 497 validation images; dense
model trained 300 AdamW steps at lr 3e-3). The two 32->32 convs are compressed; every method
then trains ``--steps`` AdamW steps (batch 64, cosine lr) from the same dense weights and the same
data order per seed, and is scored on the validation split after ``vk.finalize``. One JSON line
per run.

Example::

    python experiments/bn_digits.py --compression lowrank2 --seeds 0,1,2,3,4 --out experiments/logs/bn-digits.jsonl
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import vcon_kernels as vk

COMPRESSIONS = {"lowrank2": vk.LowRank(rank=2), "lowrank4": vk.LowRank(rank=4), "prune90": vk.Prune(sparsity=0.9),
                "binary": vk.Quantize(bits=1, granularity="tensor")}


def digits_cnn(c=32):
    return nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def train(model, x, y, steps, lr, seed, sched=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(y), (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_sched.step()
        if sched is not None:
            sched.step()


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compression", default="lowrank2", choices=list(COMPRESSIONS))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--transition", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = order[:1300], order[1300:]
    torch.manual_seed(0)
    dense = digits_cnn()
    train(dense, x[tr], y[tr], 300, 3e-3, seed=100)
    dense_acc = accuracy(dense, x[va], y[va])
    cfg = COMPRESSIONS[args.compression]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in ("oneshot", "vcon-shared-bn", "vcon"):
            started = time.time()
            model = digits_cnn()
            model.load_state_dict(dense.state_dict())
            model = vk.convert(model, cfg, filter_fn=lambda m, n: isinstance(m, nn.Conv2d) and m.in_channels > 1,
                               split_batchnorm=method == "vcon")
            sched = None
            if method == "oneshot":
                for _, layer in vk.vcon_layers(model):
                    layer.set_beta(0.0)
            else:
                sched = vk.VCONScheduler(model, steps=args.transition)
            train(model, x[tr], y[tr], args.steps, args.lr, seed=seed, sched=sched)
            acc = accuracy(vk.finalize(model), x[va], y[va])
            line = dict(task="digits-cnn-bn", compression=args.compression, method=method, seed=seed,
                        steps=args.steps, transition=args.transition, lr=args.lr, val_acc=acc,
                        dense_val_acc=dense_acc, wall_s=time.time() - started)
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"{args.compression} {method} seed {seed}: val {100 * acc:.1f}", flush=True)


if __name__ == "__main__":
    main()
