"""``torch.library.opcheck`` of every ``vcon::*`` op, every mode, in the layouts real models produce.

opcheck runs each op on real and on fake tensors and compares shapes, dtypes and *strides*
(inductor asserts that they agree, so a mismatch is a crash under ``torch.compile``), checks
the schema (no hidden mutation or aliasing) and that autograd is registered. Layouts: plain,
a 3-D input, an empty batch, a non-contiguous input, a non-contiguous (transposed) weight,
and for convolutions channels-last inputs and weights.
"""

import pytest
import torch
from cases import LINEAR_CASES
from cases import make_linear
from cases import set_betas
from torch import nn

import vcon_kernels as vk
from vcon_kernels.functional import _prepare

CASES = sorted(LINEAR_CASES)
FULL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
NO_AUTOGRAD = ("test_schema", "test_faketensor")  # backward ops are not differentiated themselves
LAYOUT_ONLY = ("test_faketensor",)  # real vs fake metadata: what the layouts can break
# test_aot_dispatch_dynamic costs ~0.25 s a call: run it for one case of each spec kind (online
# threshold, N:M, stored mask, grouped int4, binary, prune+quantize, low rank), plain layout only.
AOT_CASES = ("prune_layer", "prune_nm", "prune_once", "int4_group", "binary_tensor", "prune_int4", "lowrank")


def utils_for(layout: str, case: str, full=FULL):
    if layout != "plain":
        return LAYOUT_ONLY
    return full if case in AOT_CASES else tuple(u for u in full if u != "test_aot_dispatch_dynamic")


def transposed_storage(t: torch.Tensor) -> torch.Tensor:
    """Same values, column-major strides (what an SVD or a tied transposed weight gives)."""
    return t.detach().t().contiguous().t()


def op_args(layer, x, weight, state=None):
    rows = weight.shape[0]
    spec, beta, threshold, scales, state = _prepare((rows, weight[0].numel()), weight, layer.beta, layer.config,
                                                    layer.state if state is None else state)
    return spec, beta, threshold, scales, state


def linear_args(layer, x, weight):
    spec, beta, threshold, scales, state = op_args(layer, x, weight)
    u = None if state.lowrank_u is None else state.lowrank_u.detach().requires_grad_(True)
    v = None if state.lowrank_v is None else state.lowrank_v.detach().requires_grad_(True)
    bias = layer.bias.detach().requires_grad_(True)
    return (x, weight, bias, beta, threshold, scales, state.mask, u, v), spec


def needs_for(spec):
    return [True, True, True, spec.lowrank]


@pytest.mark.parametrize("case", CASES)
def test_linear_ops(case):
    layer = make_linear(case, "exact")
    set_betas(layer, 0.4, 0.7)
    k = layer.in_features
    w = layer.weight.detach().requires_grad_(True)
    layouts = {
        "plain": (torch.randn(5, k), w),
        "3d": (torch.randn(2, 3, k), w),
        "empty": (torch.randn(0, k), w),
        "noncontig_x": (torch.randn(k, 5).t(), w),
        "transposed_w": (torch.randn(5, k), transposed_storage(w).requires_grad_(True)),
    }
    for name, (x, weight) in layouts.items():
        x = x.requires_grad_(True)
        args, spec = linear_args(layer, x, weight)
        for keep_t in (False, True):  # keep_t: the low-rank activation t as a second output, for backward
            torch.library.opcheck(torch.ops.vcon.linear.default, (*args, *spec.as_args(), keep_t),
                                  test_utils=utils_for(name, case))
        grad_out = torch.randn(*x.shape[:-1], layer.out_features)
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        t = torch.ops.vcon.linear(*detached, *spec.as_args(), True)[1]
        for kept in (None, t) if spec.lowrank else (None,):
            torch.library.opcheck(torch.ops.vcon.linear_backward.default,
                                  (grad_out, *detached, *spec.as_args(), needs_for(spec), kept),
                                  test_utils=utils_for(name, case, NO_AUTOGRAD))


@pytest.mark.parametrize("case", [c for c in CASES if c != "lowrank"])
def test_state_and_blend_ops(case):
    layer = make_linear(case, "exact")
    set_betas(layer, 0.4, 0.7)
    for weight in (layer.weight.detach(), transposed_storage(layer.weight)):
        spec, beta, threshold, scales, state = op_args(layer, None, weight)
        torch.library.opcheck(torch.ops.vcon.compute_state.default, (weight, beta, state.mask, *spec.as_args()),
                              test_utils=NO_AUTOGRAD)
        w = weight.clone().requires_grad_(True) if weight.is_contiguous() else weight.requires_grad_(True)
        layout = "plain" if weight.is_contiguous() else "transposed_w"
        torch.library.opcheck(torch.ops.vcon.blend_weight.default,
                              (w, beta, threshold, scales, state.mask, *spec.as_args()),
                              test_utils=utils_for(layout, case))
        grad = torch.randn(weight.shape)
        torch.library.opcheck(torch.ops.vcon.weight_grad.default,
                              (grad, weight.detach(), beta, threshold, scales, state.mask, *spec.as_args()),
                              test_utils=NO_AUTOGRAD)


@pytest.mark.parametrize("case", CASES)
def test_conv_ops(case):
    factory, _ = LINEAR_CASES[case]
    torch.manual_seed(0)
    layer = vk.VCONConv2d.from_conv2d(nn.Conv2d(13, 8, 2, padding=1), factory("exact"))
    set_betas(layer, 0.4, 0.7)
    cl = torch.channels_last
    layouts = {
        "plain": (torch.randn(2, 13, 5, 5), layer.weight.detach()),
        "empty": (torch.randn(0, 13, 5, 5), layer.weight.detach()),
        "channels_last_x": (torch.randn(2, 13, 5, 5).to(memory_format=cl), layer.weight.detach()),
        "channels_last_w": (torch.randn(2, 13, 5, 5), layer.weight.detach().to(memory_format=cl)),
    }
    conv = ([1, 1], [1, 1], [1, 1], 1)
    for name, (x, weight) in layouts.items():
        x = x.requires_grad_(True)
        weight = weight.requires_grad_(True)
        args, spec = linear_args(layer, x, weight)
        for keep_t in (False, True):
            torch.library.opcheck(torch.ops.vcon.conv2d.default, (*args, *conv, *spec.as_args(), keep_t),
                                  test_utils=utils_for(name, case))
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        y, t = torch.ops.vcon.conv2d(*detached, *conv, *spec.as_args(), True)
        grad_out = torch.randn(y.shape).to(memory_format=cl if name == "channels_last_x" else torch.contiguous_format)
        for kept in (None, t) if spec.lowrank else (None,):
            torch.library.opcheck(torch.ops.vcon.conv2d_backward.default,
                                  (grad_out, *detached, *conv, *spec.as_args(), needs_for(spec), kept),
                                  test_utils=utils_for(name, case, NO_AUTOGRAD))
