"""Per-layer state (threshold, scales) computed once per weight update (state_cache.py).

Counts the state computations of real training loops (gradient accumulation, activation
checkpointing, optimizer steps) and checks that every change of W / beta / mask that the
cache key can see gives the state a fresh computation with results equal to an uncached
layer's, and that the documented blind spot (``.data`` writes) is closed by ``refresh_state``.
"""

import copy

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from torch import nn

import vcon_kernels as vk
import vcon_kernels.modules.base as base

CONFIGS = {
    "prune": lambda: vk.Prune(sparsity=0.6),
    "int8": lambda: vk.Quantize(bits=8),
    "prune_int4": lambda: vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=4, granularity="group", group_size=8)),
}


@pytest.fixture
def count(monkeypatch):
    """Number of state computations made by VCON layers."""
    calls = []
    original = base.layer_state

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(base, "layer_state", counting)
    return calls


def model(config, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    net = vk.convert(net, config)
    for _, layer in vk.vcon_layers(net):
        layer.set_beta(0.4)
    return net


def uncached(net, x):
    vk.state_cache.enable(False)
    try:
        return net(x)
    finally:
        vk.state_cache.enable(True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accumulation_computes_state_once_per_step(name, count):
    net = model(CONFIGS[name]())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(4, 5, 16)
    for step in range(3):
        for micro in range(4):
            net(x[micro]).square().mean().backward()
        assert len(count) == 2 * (step + 1), "one computation per layer per optimizer step"
        opt.step()
        opt.zero_grad()


def test_accumulated_gradients_equal_uncached():
    x = torch.randn(4, 5, 16)
    grads = []
    for cached in (True, False):
        vk.state_cache.enable(cached)
        try:
            net = model(CONFIGS["prune_int4"]())
            for micro in range(4):
                net(x[micro]).square().mean().backward()
            grads.append([p.grad.clone() for p in net.parameters()])
        finally:
            vk.state_cache.enable(True)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_checkpoint_recompute_reuses_state(count):
    net = model(CONFIGS["int8"]())
    ref = copy.deepcopy(net)
    x = torch.randn(6, 16)
    checkpoint.checkpoint(net, x, use_reentrant=False).sum().backward()
    assert len(count) == 2  # forward once per layer; the recompute in backward reuses it
    ref(x).sum().backward()
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("edit", ["optimizer", "no_grad_inplace", "load_state_dict", "set_beta", "to_double",
                                  "reset_parameters"])
def test_visible_changes_recompute(edit, count):
    net = model(CONFIGS["prune"]())
    x = torch.randn(3, 16)
    net(x)
    first = len(count)
    layer = net[0]
    if edit == "optimizer":
        net(x).sum().backward()
        torch.optim.SGD(net.parameters(), lr=0.5).step()
    elif edit == "no_grad_inplace":
        with torch.no_grad():
            layer.weight.mul_(-2.0)
    elif edit == "load_state_dict":
        net.load_state_dict(model(CONFIGS["prune"](), seed=7).state_dict())
    elif edit == "set_beta":
        layer.set_beta(0.9)
    elif edit == "to_double":
        net.double()
        x = x.double()
    elif edit == "reset_parameters":
        layer.reset_parameters()
    count.clear()
    y = net(x)
    assert len(count) >= 1, f"{edit}: state not recomputed (first pass made {first})"
    torch.testing.assert_close(y, uncached(net, x), rtol=0, atol=0)


def test_eval_and_no_grad_calls_recompute(count):
    net = model(CONFIGS["int8"]())
    x = torch.randn(3, 16)
    net.eval()
    net(x)
    net(x)
    assert len(count) == 4
    net.train()
    count.clear()
    with torch.no_grad():
        net(x)
        net(x)
    assert len(count) == 4


def test_data_writes_need_refresh_state():
    """The documented blind spot: .data has its own version counter; refresh_state closes it."""
    net = model(CONFIGS["prune"]())
    x = torch.randn(3, 16)
    net(x)
    net[0].weight.data.mul_(-3.0)  # no version bump, no optimizer step
    vk.refresh_state(net)
    torch.testing.assert_close(net(x), uncached(net, x), rtol=0, atol=0)


def test_disabled_cache_recomputes_every_call(count):
    net = model(CONFIGS["prune"]())
    x = torch.randn(3, 16)
    vk.state_cache.enable(False)
    try:
        net(x)
        net(x)
    finally:
        vk.state_cache.enable(True)
    assert len(count) == 4


def test_bad_arguments():
    with pytest.raises(TypeError, match="flag must be a bool"):
        vk.state_cache.enable(1)
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        vk.refresh_state("model")


@pytest.mark.parametrize("name", sorted(CONFIGS) + ["lowrank"])
def test_layer_with_filled_caches_copies_and_pickles(name, tmp_path):
    """deepcopy (EMA models, Trainer) and torch.save of whole modules after training calls: the
    per-call caches (one of them holds the C++ spec, which cannot be pickled) are left behind."""
    config = vk.LowRank(rank=3) if name == "lowrank" else CONFIGS[name]()
    layer = vk.VCONLinear(16, 12, config=config)
    layer.set_beta(0.5)
    x = torch.randn(4, 16)
    expected = layer(x)  # a training call: spec and state cached
    expected.sum().backward()
    twin = copy.deepcopy(layer)
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    for other in (twin, loaded):
        assert other._spec_cache is None and other._vcon_state_cache is None
        assert torch.equal(other(x), expected)
    assert layer._spec_cache is not None  # the original keeps its caches
