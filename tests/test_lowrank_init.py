"""LowRank(init=...): how the singular values are shared, and the setting that reproduces the authors' code."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcon_kernels as vk


def _svd(w):
    return torch.linalg.svd(w.detach().double(), full_matrices=False)


@pytest.mark.parametrize("init", ["split", "reference"])
def test_factors_come_from_the_truncated_svd(init):
    torch.manual_seed(0)
    lin = nn.Linear(24, 10).double()
    layer = vk.VCONLinear.from_linear(lin, vk.LowRank(rank=4, init=init))
    u, s, vh = _svd(lin.weight)
    if init == "reference":  # U = U_r diag(S_r), V = V_r^T
        torch.testing.assert_close(layer.lowrank_u, u[:, :4] * s[:4], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.lowrank_v, vh[:4], rtol=1e-12, atol=1e-12)
    else:  # sqrt(S_r) in each
        torch.testing.assert_close(layer.lowrank_u, u[:, :4] * s[:4].sqrt(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.lowrank_v, s[:4].sqrt()[:, None] * vh[:4], rtol=1e-12, atol=1e-12)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(layer.lowrank_u @ layer.lowrank_v, best, rtol=1e-10, atol=1e-10)


def test_conv_reference_init_keeps_s_in_the_1x1_output_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3).double()
    layer = vk.VCONConv2d.from_conv2d(conv, vk.LowRank(rank=2, init="reference"))
    u, s, vh = _svd(conv.weight.reshape(6, -1))
    torch.testing.assert_close(layer.lowrank_u.reshape(6, 2), u[:, :2] * s[:2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lowrank_v.reshape(2, -1), vh[:2], rtol=1e-12, atol=1e-12)


def test_bad_init_is_rejected_with_the_accepted_values():
    with pytest.raises(ValueError, match="init must be one of 'split', 'reference', got 'svd'"):
        vk.LowRank(rank=4, init="svd")


def _authors_lowrank_step_by_step(lin, x, targets, rank, steps, transition, lr):
    """The authors' algorithm in plain torch: y = beta x W^T + (1 - beta) (x V^T) U^T + b with U = U_r S_r,
    V = V_r^T, autograd through the output blend (so W gets beta G), AdamW, linear beta."""
    w = nn.Parameter(lin.weight.detach().clone())
    b = nn.Parameter(lin.bias.detach().clone())
    u, s, vh = _svd(w)
    fu = nn.Parameter((u[:, :rank] * s[:rank]).to(w.dtype))
    fv = nn.Parameter(vh[:rank].to(w.dtype).clone())
    opt = torch.optim.AdamW([w, b, fu, fv], lr=lr)
    outs = []
    for t in range(steps):
        beta = max(1.0 - t / transition, 0.0)
        beta = torch.tensor(beta, dtype=torch.float32).item()  # the layer keeps beta in fp32
        y = beta * F.linear(x, w, b) + (1 - beta) * F.linear(F.linear(x, fv), fu, b)
        loss = F.mse_loss(y, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        outs.append(y.detach())
    return outs


def _vcon_lowrank(lin, x, targets, config, steps, transition, lr):
    model = nn.Sequential(copy.deepcopy(lin))
    model = vk.convert(model, config)
    sched = vk.VCONScheduler(model, steps=transition)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    outs = []
    for _ in range(steps):
        y = model(x)
        loss = F.mse_loss(y, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        outs.append(y.detach())
    return outs


def test_exact_gradients_with_reference_init_reproduce_the_authors_algorithm():
    torch.manual_seed(0)
    lin = nn.Linear(32, 12).double()
    x, targets = torch.randn(16, 32, dtype=torch.float64), torch.randn(16, 12, dtype=torch.float64)
    assert vk.LowRank(rank=3).init == "reference"  # the default reproduces the reference
    ours = _vcon_lowrank(lin, x, targets, vk.LowRank(rank=3, grad="exact"), 12, 6, 1e-2)
    theirs = _authors_lowrank_step_by_step(lin, x, targets, 3, 12, 6, 1e-2)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, step=step: f"step {step}: {m}")
    # The split of S trains differently under AdamW (it is not invariant to how S is shared).
    split = _vcon_lowrank(lin, x, targets, vk.LowRank(rank=3, grad="exact", init="split"), 12, 6, 1e-2)
    assert (split[-1] - theirs[-1]).abs().max() > 1e-3
