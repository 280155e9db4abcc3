"""Finalized modules: equal to the VCON layer at beta = 0, really smaller, reloadable."""

import io

import pytest
import torch
from cases import LINEAR_CASES
from cases import make_linear
from torch import nn

import vcon_kernels as vk
from vcon_kernels.compressed import CompressedLinear
from vcon_kernels.compressed import DenseWeight
from vcon_kernels.compressed import LowRankLinear
from vcon_kernels.compressed import NMQuantizedWeight
from vcon_kernels.compressed import NMSparseWeight
from vcon_kernels.compressed import QuantizedWeight
from vcon_kernels.compressed import SparseWeight
from vcon_kernels.compressed import module_from_meta

CASES = sorted(LINEAR_CASES)


def assert_matches_vcon(y_final, y_vcon):
    """fp64 (plain path): bit-equal. fp32 / bf16 run the C++ compressed matmul, which sums in its
    own order (and adds the bias after the GEMM): relative error 1e-5 in fp32, bf16 rounding."""
    if y_vcon.dtype == torch.float64:
        assert torch.equal(y_vcon, y_final)
        return
    tol = 1e-5 if y_vcon.dtype == torch.float32 else 8e-3
    err = (y_final.double() - y_vcon.double()).norm() / y_vcon.double().norm()
    assert err <= tol, (err.item(), tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_finalized_equals_vcon_at_beta_zero(case, dtype):
    layer = make_linear(case, dtype=dtype, out_features=48)
    layer.set_beta(0.0)
    x = torch.randn(5, 3, layer.in_features, dtype=dtype)
    with torch.no_grad():
        y_vcon = layer(x)
        final = vk.finalize(nn.Sequential(layer))[0]
        y_final = final(x)
    assert_matches_vcon(y_final, y_vcon)


@pytest.mark.parametrize("case, storage", [
    ("prune_layer", SparseWeight), ("prune_row", DenseWeight), ("prune_nm", NMSparseWeight),
    ("prune_once", SparseWeight), ("int8_channel", QuantizedWeight), ("int4_group", QuantizedWeight),
    ("int2_tensor", QuantizedWeight), ("binary_tensor", QuantizedWeight), ("prune_binary", QuantizedWeight),
    ("nm_int8_group", NMQuantizedWeight), ("prune_int4", QuantizedWeight),
])
def test_storage_format_and_size(case, storage):
    layer = make_linear(case, out_features=64)
    dense_bytes = layer.weight.numel() * 4
    layer.set_beta(0.0)
    final = vk.finalize(nn.Sequential(layer))[0]
    assert isinstance(final, CompressedLinear) and type(final.storage) is storage
    weight_bytes = sum(t.numel() * t.element_size() for t in final.storage.state_dict().values())
    if storage is DenseWeight:  # 30% sparsity: CSR indices would cost more than they save
        assert weight_bytes == dense_bytes
    else:
        assert weight_bytes < dense_bytes


@pytest.mark.parametrize("bits, max_ratio", [(8, 0.26), (4, 0.14), (2, 0.08), (1, 0.05)])
def test_quantized_bytes_per_weight(bits, max_ratio):
    layer = vk.VCONLinear(512, 256, config=vk.Quantize(bits=bits))
    layer.set_beta(0.0)
    final = vk.finalize(nn.Sequential(layer))[0]
    ratio = vk.storage_bytes(final) / vk.storage_bytes(nn.Linear(512, 256))
    assert ratio < max_ratio


def test_lowrank_becomes_two_small_linears():
    layer = make_linear("lowrank", out_features=40)
    layer.set_beta(0.0)
    final = vk.finalize(nn.Sequential(layer))[0]
    assert isinstance(final, LowRankLinear) and final[0].weight.shape == (5, 53) and final[1].weight.shape == (40, 5)


@pytest.mark.parametrize("case", CASES)
def test_state_dict_reloads_into_empty_module(case):
    layer = make_linear(case, out_features=48)
    layer.set_beta(0.0)
    final = vk.finalize(nn.Sequential(layer))[0]
    buffer = io.BytesIO()
    torch.save(final.state_dict(), buffer)
    buffer.seek(0)
    empty = module_from_meta(final.compression_meta())
    empty.load_state_dict(torch.load(buffer))
    x = torch.randn(4, layer.in_features)
    assert torch.equal(empty(x), final(x))


def test_finalize_refuses_while_beta_positive():
    model = nn.Sequential(make_linear("prune_layer"))
    model[0].set_beta(0.1)
    with pytest.raises(ValueError, match="still have beta > 0"):
        vk.finalize(model)
    assert isinstance(model[0], vk.VCONLinear)  # unchanged
    x = torch.randn(2, 53)
    forced = vk.finalize(model, force=True)
    layer = make_linear("prune_layer")
    layer.set_beta(0.0)
    with torch.no_grad():
        assert_matches_vcon(forced(x), layer(x))


def test_finalize_twice_raises():
    model = nn.Sequential(make_linear("int8_channel"))
    model[0].set_beta(0.0)
    vk.finalize(model)
    with pytest.raises(ValueError, match="no VCON layers"):
        vk.finalize(model)


def test_finalize_is_atomic():
    model = nn.Sequential(make_linear("int8_channel"), nn.ReLU(), make_linear("prune_layer", out_features=53))
    model[0].set_beta(0.0)
    model[2].set_beta(0.5)
    with pytest.raises(ValueError, match=r"1 of 2 VCON layers still have beta > 0 \(e.g. 2: prune=0.5\)"):
        vk.finalize(model)
    assert isinstance(model[0], vk.VCONLinear) and isinstance(model[2], vk.VCONLinear)


def test_finalized_conv_equals_vcon():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, padding_mode="reflect",
                                                                             padding=1), nn.Conv2d(8, 4, 1))
    for cfg in [vk.Prune(sparsity=0.7), vk.Quantize(bits=4, granularity="tensor"),
                vk.Compose(vk.Prune(granularity="nm", n=1, m=4), vk.Quantize(bits=2)), vk.Quantize(bits=1)]:
        m = vk.convert(_copy(model), cfg)
        for _, layer in vk.vcon_layers(m):
            layer.set_beta(0.0)
        x = torch.randn(2, 4, 9, 9)
        with torch.no_grad():
            y = m(x)
            assert torch.equal(vk.finalize(m)(x), y), cfg
    m = vk.convert(_copy(model), vk.LowRank(rank=2), filter_fn=lambda mod, name: mod.groups == 1)
    for _, layer in vk.vcon_layers(m):
        layer.set_beta(0.0)
    with torch.no_grad():
        y = m(x)
        assert torch.equal(vk.finalize(m)(x), y)


def _copy(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)
