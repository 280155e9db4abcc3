"""A short real VCON run: prune an MLP trained on scikit-learn's bundled digits by 90%.

Trains the dense MLP, then fine-tunes with VCON (beta fades over the first half of the
budget), finalizes, and prints accuracy and model size before/after.
"""

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import vcon_kernels as vk


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(model, x, y, steps, sched=None, lr=3e-3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return loss.item()


def main():
    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    x_tr, x_te, y_tr, y_te = (torch.as_tensor(a) for a in train_test_split(x, y, test_size=0.25, random_state=0))
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    train(model, x_tr, y_tr, 600)
    dense_acc, dense_bytes = accuracy(model, x_te, y_te), vk.storage_bytes(model)
    print(f"dense:        test accuracy {dense_acc:.4f}, {dense_bytes / 1024:.1f} KiB")

    model = vk.convert(model, vk.Prune(sparsity=0.9))
    sched = vk.VCONScheduler(model, steps=200)
    train(model, x_tr, y_tr, 400, sched=sched, lr=1e-3, seed=1)
    vcon_acc = accuracy(model, x_te, y_te)
    model = vk.finalize(model)
    final_acc, final_bytes = accuracy(model, x_te, y_te), vk.storage_bytes(model)
    print(f"VCON (beta=0): test accuracy {vcon_acc:.4f}")
    print(f"finalized:    test accuracy {final_acc:.4f}, {final_bytes / 1024:.1f} KiB "
          f"({dense_bytes / final_bytes:.1f}x smaller)")


if __name__ == "__main__":
    main()
