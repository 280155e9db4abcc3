"""The Triton backend under bf16 autocast: fp32 master weights, bf16 activations (interpreted on CPU).

Same contract as tests/test_autocast.py for the torch and C++ backends: output in bf16, parameter
gradients in fp32, and values equal to the plain-torch backend's under the same autocast within bf16
rounding (relative max error, since a cast of the blended weight to bf16 is one rounding per entry).
"""

import pytest
import torch
import triton  # noqa: F401  (a missing Triton fails this module, it does not skip it)
from cases import make_linear
from cases import set_betas
from triton_helpers import DEVICE

import vcon_kernels as vk

CASES = ["prune_layer", "prune_nm", "int8_channel", "int4_group", "binary_tensor", "prune_int4", "lowrank"]
DEVICE_TYPE = DEVICE.type


def run(layer, x, backend):
    xi = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with vk.backends.use(backend), torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16):
        y = layer(xi)
    y.float().square().sum().backward()
    return y, xi.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_torch_under_bf16_autocast(case):
    layer = make_linear(case).to(DEVICE)
    set_betas(layer, 0.4, 0.7)
    x = torch.randn(6, layer.in_features, device=DEVICE)
    y, dx, grads = run(layer, x, "triton")
    y_ref, dx_ref, grads_ref = run(layer, x, "torch")
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads.values())
    for got, want in [(y, y_ref), (dx, dx_ref)] + [(grads[n], grads_ref[n]) for n in grads_ref]:
        got, want = got.double(), want.double()
        assert (got - want).abs().max() <= 2e-2 * want.abs().max() + 1e-6
