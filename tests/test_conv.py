"""VCONConv2d against the naive reference: modes, groups/depthwise, padding modes, low rank."""

import pytest
import torch
from torch import nn

import vcon_kernels as vk
from vcon_kernels.reference import ReferenceVCON

CONFIGS = {
    "prune_layer": lambda g: vk.Prune(sparsity=0.6, grad=g),
    "prune_row": lambda g: vk.Prune(sparsity=0.4, granularity="row", grad=g),
    "prune_nm": lambda g: vk.Prune(granularity="nm", n=1, m=3, grad=g),
    "prune_once": lambda g: vk.Prune(sparsity=0.5, update="once", grad=g),
    "int4_channel": lambda g: vk.Quantize(bits=4, grad=g),
    "int8_group": lambda g: vk.Quantize(bits=8, granularity="group", group_size=9, grad=g),
    "binary_tensor": lambda g: vk.Quantize(bits=1, granularity="tensor", grad=g),
    "prune_int8": lambda g: vk.Compose(vk.Prune(sparsity=0.5, grad=g), vk.Quantize(bits=8, grad=g)),
    "lowrank": lambda g: vk.LowRank(rank=3, grad=g),
}
# (in, out, kernel, stride, padding, dilation, groups, padding_mode); every in/groups*k*k divisible by 3 and 9.
GEOMETRIES = {
    "plain": (6, 5, 3, 1, 1, 1, 1, "zeros"),
    "strided_dilated": (3, 4, 3, 2, 2, 2, 1, "zeros"),
    "grouped": (6, 4, 3, 1, 0, 1, 2, "zeros"),
    "depthwise": (4, 4, 3, 1, 1, 1, 4, "reflect"),
    "same_circular": (3, 5, (3, 3), 1, "same", 1, 1, "circular"),
}


def make_conv(config_name, geometry, grad="ste", dtype=torch.float64, seed=0):
    cin, cout, k, stride, padding, dilation, groups, mode = GEOMETRIES[geometry]
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, True, mode, dtype=dtype)
    return conv, vk.VCONConv2d.from_conv2d(conv, CONFIGS[config_name](grad))


def _params(layer):
    return [p for p in (layer.weight, layer.bias, getattr(layer, "lowrank_u", None),
                        getattr(layer, "lowrank_v", None)) if p is not None]


def _fwd_bwd(module, layer, x, g):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(g)
    return y.detach(), [x.grad] + [None if p.grad is None else p.grad.clone() for p in _params(layer)]


@pytest.fixture(autouse=True)
def torch_backend():
    with vk.backends.use("torch"):
        yield


# Every beta on the plain geometry; the others (which only change the convolution call) at 0.37.
# Low rank needs groups=1 (rejection tested in test_lowrank_rejects_grouped).
GEOMETRY_BETAS = [("plain", b) for b in (0.0, 0.37, 1.0)] + [(g, 0.37) for g in sorted(GEOMETRIES) if g != "plain"]
CONV_CASES = [(c, g, b) for c in sorted(CONFIGS) for g, b in GEOMETRY_BETAS
              if not (c == "lowrank" and GEOMETRIES[g][6] != 1)]


@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("config_name, geometry, beta", CONV_CASES)
def test_conv_matches_reference(config_name, geometry, beta, grad):
    _, layer = make_conv(config_name, geometry, grad)
    layer.set_beta(beta)
    x = torch.randn(2, layer.in_channels, 7, 6, dtype=torch.float64)
    g = torch.randn_like(layer(x))
    y, grads = _fwd_bwd(layer, layer, x, g)
    y_ref, grads_ref = _fwd_bwd(ReferenceVCON(layer), layer, x, g)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads, grads_ref):
        if b is None:  # low rank at beta 0: W gets no gradient
            assert a is None
            continue
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("config_name, geometry", sorted({(c, g) for c, g, _ in CONV_CASES}))
def test_beta_one_is_nn_conv2d_bit_exact(config_name, geometry):
    conv, layer = make_conv(config_name, geometry, dtype=torch.float32)
    dense = nn.Conv2d(**layer.conv_kwargs())
    dense.load_state_dict(conv.state_dict())
    x = torch.randn(2, layer.in_channels, 8, 9)
    assert torch.equal(layer(x), dense(x))


def test_lowrank_rejects_grouped():
    with pytest.raises(ValueError, match="LowRank needs groups=1"):
        vk.VCONConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2), vk.LowRank(rank=2))


def test_channels_last_and_half():
    _, layer = make_conv("int4_channel", "plain", dtype=torch.float32)
    layer.set_beta(0.3)
    x = torch.randn(2, 6, 7, 6)
    y = layer(x)
    y_cl = layer(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, y_cl, atol=1e-5, rtol=1e-5)
    layer16 = layer.to(torch.bfloat16)
    assert layer16.beta.dtype == torch.float32
    assert layer16(x.bfloat16()).dtype == torch.bfloat16


def test_conv_gradcheck_exact():
    _, layer = make_conv("prune_row", "grouped", "exact")
    layer.set_beta(0.3)
    x = torch.randn(1, 6, 5, 5, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return vk.functional.vcon_conv2d(x, w, b, layer.beta, layer.config, layer.state,
                                         layer.stride, layer._conv_padding, layer.dilation, layer.groups)

    assert torch.autograd.gradcheck(fn, (x, layer.weight, layer.bias), eps=1e-7)
