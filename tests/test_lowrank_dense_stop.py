"""Low rank at beta = 0: the dense path is stopped (dW = 0 in both gradient modes, every backend).

At beta = 0 the output no longer depends on W; the authors' reference stops updating it. The
gradient is zero (not None: DDP / FSDP expect one for every parameter, and a compiled graph has
no beta-dependent branch); for beta > 0, STE still gives W the full G = dY^T X.
"""

import pytest
import torch

import vcon_kernels as vk


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dense_path_stops_at_beta_zero(kind, grad, backend):
    torch.manual_seed(0)
    if kind == "linear":
        layer = vk.VCONLinear(12, 9, config=vk.LowRank(rank=3, grad=grad))
        x = torch.randn(5, 12)
    else:
        layer = vk.VCONConv2d.from_conv2d(torch.nn.Conv2d(4, 6, 3), vk.LowRank(rank=2, grad=grad))
        x = torch.randn(2, 4, 7, 7)
    with vk.backends.use(backend):
        layer.set_beta(0.0)
        layer(x).square().sum().backward()
        assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
        assert layer.lowrank_u.grad.abs().sum() > 0 and layer.lowrank_v.grad.abs().sum() > 0
        layer.zero_grad()
        layer.set_beta(0.25)  # raised again: W trains again
        layer(x).square().sum().backward()
        assert layer.weight.grad.abs().sum() > 0
