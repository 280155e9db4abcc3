"""The weight transforms themselves: kept counts, N:M rule, scales, rounding, bit packing."""

import pytest
import torch

import vcon_kernels as vk
from vcon_kernels import torch_transforms as transforms
from vcon_kernels.packing import pack_uint
from vcon_kernels.packing import unpack_uint
from vcon_kernels.spec import TransformSpec


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.999])
@pytest.mark.parametrize("shape", [(37, 53), (1, 7), (64, 128)])
def test_layer_threshold_keeps_round_count(shape, sparsity):
    w = torch.randn(shape)
    t = transforms.prune_threshold(w, sparsity, per_row=False)
    kept = int((w.abs() >= t).sum())
    assert kept == round(w.numel() * (1 - sparsity))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_row_threshold_keeps_round_count_per_row(sparsity):
    w = torch.randn(11, 53)
    t = transforms.prune_threshold(w, sparsity, per_row=True)
    assert t.shape == (11,)
    assert ((w.abs() >= t[:, None]).sum(1) == round(53 * (1 - sparsity))).all()


def test_keep_nothing_gives_infinite_threshold():
    w = torch.randn(3, 4)
    t = transforms.prune_threshold(w, 0.99, per_row=True)
    assert torch.isinf(t).all() and not (w.abs() >= t[:, None]).any()


def test_threshold_dtype_follows_compute_dtype():
    assert transforms.prune_threshold(torch.randn(4, 4).double(), 0.5, False).dtype == torch.float64
    assert transforms.prune_threshold(torch.randn(4, 4).bfloat16(), 0.5, False).dtype == torch.float32


def test_nm_keeps_n_per_group_and_lower_index_wins_ties():
    w = torch.tensor([[1.0, -1.0, 1.0, 0.5, 3.0, 2.0, -2.0, 0.1]])
    keep = transforms.nm_keep_mask(w, 2, 4)
    assert keep.tolist() == [[True, True, False, False, True, True, False, False]]
    w = torch.randn(20, 48)
    keep = transforms.nm_keep_mask(w, 3, 8)
    assert (keep.view(20, 6, 8).sum(-1) == 3).all()
    # The kept ones are the largest of their group.
    a = w.abs().view(20, 6, 8)
    k = keep.view(20, 6, 8)
    assert (a.masked_fill(~k, -1).amax(-1) == a.amax(-1)).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [0, 53, 13 * 4])
def test_int_fake_quant_formula(bits, group_size):
    k = 52 if group_size == 52 else 53
    gs = {0: 0, 53: k, 52: 13}[group_size]
    w = torch.randn(9, k)
    spec = TransformSpec(bits=bits, group_size=gs)
    scales = transforms.quant_scales(w, spec)
    q, in_range = transforms.fake_quant(w, scales, spec)
    qmax = 2 ** (bits - 1) - 1
    g = transforms.grouped(w, gs)
    s = g.abs().amax(-1, keepdim=True) / qmax
    expected = (torch.round(g / s).clamp(-qmax - 1, qmax) * s).reshape(w.shape)
    torch.testing.assert_close(q, expected, atol=0, rtol=0)
    assert in_range.all()  # absmax scales never clamp
    # at most 2^bits distinct levels per group
    assert max(len(torch.unique(row)) for row in transforms.grouped(q, gs).reshape(-1, g.shape[-1])) <= 2 ** bits


def test_round_half_to_even():
    spec = TransformSpec(bits=8, group_size=4)
    w = torch.tensor([[127.0, 2.5, 3.5, -2.5]])  # scale 1 -> codes 127, 2, 4, -2
    q, _ = transforms.fake_quant(w, transforms.quant_scales(w, spec), spec)
    assert q.tolist() == [[127.0, 2.0, 4.0, -2.0]]


def test_zero_group_quantizes_to_zero():
    spec = TransformSpec(bits=4, group_size=3)
    w = torch.tensor([[0.0, 0.0, 0.0, 1.0, -2.0, 0.5]])
    q, _ = transforms.fake_quant(w, transforms.quant_scales(w, spec), spec)
    assert q[0, :3].tolist() == [0.0, 0.0, 0.0] and torch.isfinite(q).all()


def test_binary_scale_is_mean_of_nonzero_magnitudes():
    spec = TransformSpec(bits=1, group_size=4)
    w = torch.tensor([[1.0, -3.0, 0.0, 2.0]])
    scales = transforms.quant_scales(w, spec)
    assert scales.item() == pytest.approx(2.0)
    q, in_range = transforms.fake_quant(w, scales, spec)
    assert q.tolist() == [[2.0, -2.0, 0.0, 2.0]] and in_range is None


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("length", [1, 7, 8, 53])
def test_pack_round_trip(nbits, length):
    values = torch.randint(0, 2 ** nbits, (5, length))
    packed = pack_uint(values, nbits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (length * nbits + 7) // 8)
    assert torch.equal(unpack_uint(packed, nbits, length).long(), values)


def test_pack_layout_is_little_endian_within_a_byte():
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 0, 1]])
    assert pack_uint(mask, 1).tolist() == [[1, 2]]


def test_stored_mask_is_frozen_until_refreshed():
    layer = vk.VCONLinear(16, 8, config=vk.Prune(sparsity=0.5, update="once"))
    before = layer.mask.clone()
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight))
    assert torch.equal(layer.mask, before)
    layer.refresh_mask()
    online = vk.VCONLinear.from_linear(torch.nn.Linear(16, 8), vk.Prune(sparsity=0.5))
    with torch.no_grad():
        online.weight.copy_(layer.weight)
    spec = online.spec()
    threshold, _ = transforms.compute_state(online.weight, online.beta, None, spec)
    expected = transforms.keep_mask(online.weight, threshold, None, spec)
    assert torch.equal(transforms.keep_mask(layer.weight, None, layer.mask, layer.spec()), expected)


def test_online_mask_stores_nothing():
    layer = vk.VCONLinear(16, 8, config=vk.Prune(sparsity=0.5))
    assert layer.mask is None
    assert set(layer.state_dict()) == {"weight", "bias", "beta"}
