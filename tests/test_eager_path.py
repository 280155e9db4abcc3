"""The eager fast path (eager.py) computes exactly what the torch.ops.vcon ops compute.

Each case runs a layer twice on the same parameters: once as users call it (eager mode, plain
tensors: the fast path) and once under a do-nothing ``TorchFunctionMode``, which makes
``eager.can_run`` answer False and routes the call through the ops (as under torch.compile or
with tensor subclasses). Output and every gradient must be bitwise equal, for every mode, both
backends, fp32 and under bf16 autocast, for linears and convolutions; and the routing itself is
checked by counting the vcon ops a dispatch mode sees.
"""

import os

import pytest
import torch
from cases import LINEAR_CASES
from cases import make_linear
from cases import run_fwd_bwd
from cases import set_betas
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import vcon_kernels as vk
from vcon_kernels import eager

BACKENDS = ["torch", "cpp"]


class Passthrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class CountVconOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vcon":
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def both_paths(layer, x, g, autocast=None):
    results = []
    for mode in (None, Passthrough()):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            if mode is None:
                results.append(run_fwd_bwd(layer, layer, x, g))
            else:
                with mode:
                    results.append(run_fwd_bwd(layer, layer, x, g))
    return results


def assert_same(fast, ops):
    (y, grads), (y_ops, grads_ops) = fast, ops
    assert y.dtype == y_ops.dtype and torch.equal(y, y_ops)
    assert grads.keys() == grads_ops.keys()
    for name in grads:
        assert (grads[name] is None) == (grads_ops[name] is None), name
        if grads[name] is not None:
            assert torch.equal(grads[name], grads_ops[name]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_linear_fast_path_equals_ops(case, grad, backend):
    layer = make_linear(case, grad)
    set_betas(layer, 0.35, 0.6)
    x = torch.randn(2, 3, layer.in_features)
    g = torch.randn(2, 3, layer.out_features)
    with vk.backends.use(backend):
        assert_same(*both_paths(layer, x, g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["prune_layer", "int4_group", "prune_int4", "lowrank"])
def test_linear_fast_path_equals_ops_under_autocast(case, backend):
    layer = make_linear(case)
    set_betas(layer, 0.5, 0.25)
    x = torch.randn(5, layer.in_features)
    g = torch.randn(5, layer.out_features, dtype=torch.bfloat16)
    with vk.backends.use(backend):
        fast, ops = both_paths(layer, x, g, autocast=torch.bfloat16)
    assert fast[0].dtype == torch.bfloat16 and fast[1]["weight"].dtype == torch.float32
    assert_same(fast, ops)


@pytest.mark.parametrize("config", [vk.Prune(sparsity=0.5), vk.Quantize(bits=4, granularity="tensor"),
                                    vk.LowRank(rank=3)], ids=["prune", "int4", "lowrank"])
def test_conv_fast_path_equals_ops(config):
    torch.manual_seed(0)
    layer = vk.VCONConv2d.from_conv2d(torch.nn.Conv2d(6, 10, 3, padding=1, stride=2), config)
    layer.set_beta(0.4)
    x = torch.randn(2, 6, 9, 8)
    g = torch.randn_like(layer(x))
    assert_same(*both_paths(layer, x, g))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert_same(*both_paths(layer, x_cl, g.contiguous(memory_format=torch.channels_last)))


def test_routing():
    layer = make_linear("int8_channel")
    x = torch.randn(4, layer.in_features)
    assert eager.can_run(x, layer.weight)
    layer(x)  # state computed and cached by this training call
    with CountVconOps() as seen:
        layer(x).sum().backward()
    assert seen.names == ["linear", "linear_backward"]  # a dispatch mode gets the ops, not the fast path
    with Passthrough():
        assert not eager.can_run(x, layer.weight)
    assert not eager.can_run(x.as_subclass(SubTensor), layer.weight)


class SubTensor(torch.Tensor):
    pass


def test_inference_fast_path_builds_no_graph():
    layer = make_linear("prune_layer")
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None
    with torch.inference_mode():
        y_inf = layer(x)
    assert torch.equal(y, y_inf)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    assert layer(x).grad_fn is None  # a frozen layer on a constant input: nothing to differentiate


def _grad_fn_name(layer, x):
    return layer(x).grad_fn.name()


@pytest.mark.skipif(vk.backends.available()["cpp"] is not True and not os.environ.get("VCON_REQUIRE_CPP"),
                    reason="cpp backend unavailable")
def test_cpp_training_call_goes_straight_to_the_cpp_node():
    """With the C++ backend, a plain eager training call of VCONLinear reaches ``_C.linear_autograd``
    directly (its node is C++); every case the node does not cover takes the Python path."""
    layer = make_linear("prune_layer")
    layer.set_beta(0.5)
    x = torch.randn(3, layer.in_features)
    with vk.backends.use("cpp"):
        assert "LinearNode" in _grad_fn_name(layer, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16  # not the direct call: autocast casts x first
        with Passthrough():
            assert "LinearNode" not in _grad_fn_name(layer, x)
        assert "LinearNode" not in _grad_fn_name(layer, x.double().float().as_subclass(SubTensor))
        with pytest.raises(ValueError, match="input's last dimension must be"):  # the node's failure, explained
            layer(torch.randn(3, layer.in_features + 1))
        with pytest.raises(TypeError, match="does not match the weight dtype"):
            layer(x.double())
    with vk.backends.use("torch"):
        assert "LinearNode" not in _grad_fn_name(layer, x)
