"""A short real training run on scikit-learn's bundled digits, for every mode."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import vcon_kernels as vk

CONFIGS = {
    "prune90": vk.Prune(sparsity=0.9),
    "nm24_once": vk.Prune(granularity="nm", n=2, m=4, update="once"),
    "int4": vk.Quantize(bits=4),
    "binary": vk.Quantize(bits=1, granularity="tensor"),
    "prune_int8": vk.Compose(vk.Prune(sparsity=0.7), vk.Quantize(bits=8)),
    "lowrank": vk.LowRank(rank=8),
}


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


@pytest.fixture(scope="module")
def dense_model(digits):
    (x, y), _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    train(model, x, y, 300, lr=3e-3)
    return model.state_dict()


def train(model, x, y, steps, lr, sched=None):
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def evaluate(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_vcon_training_run(name, digits, dense_model):
    (x, y), (x_te, y_te) = digits
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    model.load_state_dict(dense_model)
    dense_acc = evaluate(model, x_te, y_te)
    vk.convert(model, CONFIGS[name], filter_fn=lambda m, n: n != "4")
    sched = vk.VCONScheduler(model, steps=100)
    losses = train(model, x, y, 200, lr=1e-3, sched=sched)
    assert sched.finished
    # Loss after the transition is well below the loss in the middle of it, and in range of dense.
    assert sum(losses[-20:]) / 20 < sum(losses[90:110]) / 20 + 1e-3
    vcon_acc = evaluate(model, x_te, y_te)
    assert vcon_acc > dense_acc - 0.1
    final = vk.finalize(model)
    assert evaluate(final, x_te, y_te) == vcon_acc
    with torch.no_grad():
        assert (final(x_te).argmax(1) == model(x_te).argmax(1)).all()
