"""The C++ compressed matmul of finalized layers (compressed/matmul.py, csrc/infer*).

Every storage format against a float64 plain-torch reference (its own materialize()), odd
shapes, decode and prefill batch sizes, fp32 / bf16 / fp16 activations; dtype casts of
every finalized format before and after a state_dict round trip; autocast and autograd
take the plain path. Without the extension the fast-path tests skip with the reason,
except under ``VCON_REQUIRE_CPP=1`` (CI), where that is an error.
"""

import io
import os

import pytest
import torch
import torch.nn.functional as F
from cases import LINEAR_CASES
from cases import make_linear
from torch import nn

import vcon_kernels as vk
from vcon_kernels.compressed import NMQuantizedWeight
from vcon_kernels.compressed import NMSparseWeight
from vcon_kernels.compressed import QuantizedWeight
from vcon_kernels.compressed import SparseQuantizedWeight
from vcon_kernels.compressed import SparseWeight
from vcon_kernels.compressed import matmul
from vcon_kernels.compressed import module_from_meta
from vcon_kernels.compressed.storage import storage_from_meta
from vcon_kernels.spec import TransformSpec

if not matmul.fast_path_available():
    if os.environ.get("VCON_REQUIRE_CPP"):
        raise RuntimeError("VCON_REQUIRE_CPP is set but vcon_kernels._C has no infer_linear (rebuild it)")
    pytestmark = pytest.mark.skip(reason="the C++ extension (with infer_linear) is not built")

TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}
BATCHES = (1, 2, 3, 4, 5, 9, 33)  # the GEMV up to DECODE_MAX_M (2 bf16, 8 fp32), then dequantize + GEMM


def _codes(shape, bits, gen, zeros=0.0):
    if bits == 1:
        c = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
    else:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        c = torch.randint(lo, hi + 1, shape, generator=gen).float()
    if zeros:
        c = c * (torch.rand(shape, generator=gen) >= zeros)
    return c


def _scales(rows, cols, group_size, gen):
    spec = TransformSpec(bits=8, group_size=group_size)
    return torch.rand(spec.scales_shape(rows, cols), generator=gen) + 0.05


def _nm_keep(shape, n, m, gen):
    rows, cols = shape
    order = torch.rand(rows, cols // m, m, generator=gen).argsort(-1)[..., :n]
    keep = torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, order, True)
    return keep.reshape(rows, cols)


def _storages(rows, cols, dtype):
    """One storage of every format (and the kernel variants: fused int8/int4, generic rest)."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    out = {}
    int4_32 = [(4, 0), (4, 32)] if cols % 32 == 0 else []  # the AVX-512 int4 GEMV's cases (32k columns)
    for bits, group in [(8, 0), (8, cols), (8, cols // 4), (4, cols), (4, cols // 2), (4, cols // 4), (2, 0),
                        (2, cols), (1, 0), (1, cols // 4), *int4_32]:
        spec = TransformSpec(bits=bits, group_size=group)
        zeros = 0.3 if bits == 1 and group else 0.0  # binary with exact zeros: the non-zero bit plane
        out[f"q{bits}_g{group}"] = QuantizedWeight(_codes((rows, cols), bits, gen, zeros),
                                                   _scales(rows, cols, group, gen), spec, dtype)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    for n, m in [(2, 4), (1, 4), (3, 13) if cols % 13 == 0 else (4, 8)]:  # 13: 4-bit positions
        out[f"nm{n}:{m}"] = NMSparseWeight(w, _nm_keep((rows, cols), n, m, gen), n, m)
        spec = TransformSpec(bits=8, group_size=cols // 4)
        keep = _nm_keep((rows, cols), n, m, gen)
        codes = _codes((rows, cols), 8, gen) * keep
        out[f"nmq{n}:{m}"] = NMQuantizedWeight(codes, keep, n, m, _scales(rows, cols, cols // 4, gen), spec, dtype)
    keep = torch.rand(rows, cols, generator=gen) > 0.9
    keep[0] = False  # an empty row
    out["csr"] = SparseWeight(w, keep)
    for bits, group in [(8, 0), (4, cols // 4)]:
        spec = TransformSpec(bits=bits, group_size=group)
        out[f"csrq{bits}_g{group}"] = SparseQuantizedWeight(_codes((rows, cols), bits, gen) * keep, keep,
                                                            _scales(rows, cols, group, gen), spec, dtype)
    return out


def _rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("prefill", ["whole", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows, cols", [(37, 52), (19, 256)])
def test_every_format_matches_float64_reference(rows, cols, dtype, prefill, monkeypatch):
    # Both prefill paths: the whole weight + torch's addmm (small weights) and the blocks + sgemm.
    monkeypatch.setattr(matmul, "WHOLE_MAX_BYTES", 1 << 30 if prefill == "whole" else 0)
    gen = torch.Generator().manual_seed(7)
    bias = torch.randn(rows, generator=gen).to(dtype)
    for name, st in _storages(rows, cols, dtype).items():
        w64 = st.materialize().double()
        for m in BATCHES:
            x = torch.randn(m, cols, generator=gen).to(dtype)
            assert matmul._fast_ok(x, st), name
            y = matmul.compressed_linear(x, st, bias)
            ref = F.linear(x.double(), w64, bias.double())
            assert y.dtype == dtype and y.shape == (m, rows)
            assert _rel_err(y, ref) <= TOL[dtype], (name, m, _rel_err(y, ref))


@pytest.fixture(params=matmul._C.infer_isas() if matmul.fast_path_available() else [])
def infer_isa(request):
    """Each kernel copy this CPU runs (default, avx2, avx512), not only the one auto picks."""
    matmul._C.set_infer_isa(request.param)
    yield request.param
    matmul._C.set_infer_isa("auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows, cols", [(37, 52), (11, 96), (19, 256)])  # 96: an odd number of 32-column groups
def test_decode_of_every_isa_matches_float64_reference(rows, cols, dtype, infer_isa):
    gen = torch.Generator().manual_seed(11)
    bias = torch.randn(rows, generator=gen).to(dtype)
    for name, st in _storages(rows, cols, dtype).items():
        w64 = st.materialize().double()
        for m in range(1, matmul.DECODE_MAX_M[dtype] + 1):
            x = torch.randn(m, cols, generator=gen).to(dtype)
            if m == 1:
                x[0, : cols // 2] += 3.0  # a large mean: what a qmin * sum(x) shortcut would lose to cancellation
            y = matmul.compressed_linear(x, st, bias)
            ref = F.linear(x.double(), w64, bias.double())
            assert _rel_err(y, ref) <= TOL[dtype], (infer_isa, name, m, _rel_err(y, ref))
    assert matmul._C.infer_isa() == infer_isa


def test_set_infer_isa_rejects_unknown_names():
    with pytest.raises(RuntimeError, match="isa must be 'auto' or one"):
        matmul._C.set_infer_isa("sse9")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_whole_weight_prefill_is_f_linear_bit_for_bit(dtype):
    """Small weights at prefill run F.linear's own addmm on exactly materialize()'s weight."""
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(37, generator=gen).to(dtype)
    x = torch.randn(2, 20, 52, generator=gen).to(dtype)  # 40 rows: above the GEMV's batch sizes
    for name, st in _storages(37, 52, dtype).items():
        with torch.inference_mode():
            y = matmul.compressed_linear(x, st, bias)
            assert torch.equal(y, F.linear(x, st.materialize(), bias)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_one_pass_dequantize_is_materialize_bit_for_bit(dtype, infer_isa):
    for name, st in {**_storages(37, 52, dtype), **_storages(19, 256, dtype)}.items():
        w = matmul.dense_weight(st)
        assert w.dtype == dtype and torch.equal(w, st.materialize()), (infer_isa, name)


@pytest.mark.parametrize("config", [vk.Quantize(bits=4, granularity="group", group_size=9), vk.Prune(sparsity=0.9),
                                    vk.Compose(vk.Prune(granularity="nm", n=2, m=4), vk.Quantize(bits=8))],
                         ids=["int4_g9", "csr_90", "nm_2_4_int8"])
def test_compressed_conv_uses_the_one_pass_weight(config):
    layer = vk.convert(nn.Sequential(nn.Conv2d(8, 12, 3, padding=1)), config)[0]  # K = 8 * 3 * 3 = 72
    layer.set_beta(0.0)
    final = vk.finalize(nn.Sequential(layer))[0]
    x = torch.randn(2, 8, 7, 7)
    with torch.inference_mode():
        w = final.storage.materialize().view(final.weight_shape)
        assert torch.equal(final(x), F.conv2d(x, w, final.bias, padding=1))


def test_bias_that_needs_a_gradient_gets_one():
    st = _storages(37, 52, torch.float32)["q4_g13"]
    layer = vk.compressed.CompressedLinear(st, torch.randn(37))
    x = torch.randn(12, 52)
    assert matmul._fast_ok(x, st)  # x wants no gradient: the C++ kernel runs, the bias is added after it
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((37,), 12.0))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, st.materialize(), layer.bias))


def test_leading_dims_and_noncontiguous_input():
    st = _storages(37, 52, torch.float32)["q4_g26"]
    x = torch.randn(3, 52, 2).transpose(1, 2)  # (3, 2, 52), not contiguous
    y = matmul.compressed_linear(x, st)
    ref = F.linear(x.double(), st.materialize().double())
    assert y.shape == (3, 2, 37) and _rel_err(y, ref) <= 1e-5


def test_wrong_feature_count_names_the_sizes():
    st = _storages(37, 52, torch.float32)["q8_g0"]
    with pytest.raises(ValueError, match="x has 51 features in its last dim, the layer expects 52"):
        matmul.compressed_linear(torch.randn(2, 51), st)


def test_kernel_rejects_mismatched_buffers():
    st = _storages(37, 52, torch.float32)["q8_g13"]
    fmt, a, b, crow, scales, bits, qmin, group, n, m, ib = st.infer_args()
    with pytest.raises(RuntimeError, match=r"scales has 111 values, expected 148"):
        matmul._C.infer_linear(torch.randn(1, 52), fmt, a, b, crow, scales[:, :3].contiguous(), 37, bits, qmin,
                               13, n, m, ib, 4)
    with pytest.raises(RuntimeError, match="codes must be"):
        matmul._C.infer_linear(torch.randn(1, 52), fmt, a[:, :40].contiguous(), b, crow, scales, 37, bits, qmin,
                               group, n, m, ib, 4)


@pytest.mark.parametrize("rows, cols", [(37, 52), (19, 256)])
def test_empty_storages_build_on_meta_with_the_stored_layout(rows, cols):
    """from_meta builds every format on the meta device (no dense-sized temporary on the CPU while
    loading) with the buffers a real storage has, and a CPU one loads its state_dict exactly."""
    for name, st in _storages(rows, cols, torch.float32).items():
        layout = {k: (tuple(v.shape), v.dtype) for k, v in st.state_dict().items()}
        on_meta = storage_from_meta(st.meta(), device="meta")
        assert {k: (tuple(v.shape), v.dtype) for k, v in on_meta.state_dict().items()} == layout, name
        empty = storage_from_meta(st.meta())
        assert {k: (tuple(v.shape), v.dtype) for k, v in empty.state_dict().items()} == layout, name
        empty.load_state_dict(st.state_dict())
        assert repr(empty) == repr(st) and torch.equal(empty.materialize(), st.materialize()), name


def test_csr_load_checks_column_indices():
    st = _storages(37, 52, torch.float32)["csr"]
    state = st.state_dict()
    state["col_indices"] = state["col_indices"].clone()
    state["col_indices"][3] = 52
    empty = SparseWeight.from_meta(st.meta())
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 52\)"):
        empty.load_state_dict(state)


def test_autograd_and_autocast_take_the_plain_path():
    st = _storages(37, 52, torch.float32)["nmq2:4"]
    layer = vk.compressed.CompressedLinear(st, torch.randn(37))
    x = torch.randn(5, 52, requires_grad=True)
    assert not matmul._fast_ok(x, st)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, st.materialize().sum(0).expand(5, 52))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.detach())
    assert y.dtype == torch.bfloat16
    assert _rel_err(y, F.linear(x.double(), st.materialize().double(), layer.bias.double())) <= 8e-3


def _round_trip(module):
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    empty = module_from_meta(module.compression_meta())
    empty.load_state_dict(torch.load(buffer))
    return empty


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_every_finalized_format_follows_dtype_casts(case):
    layer = make_linear(case, out_features=40)
    layer.set_beta(0.0)
    final = vk.finalize(nn.Sequential(layer))[0]
    x = torch.randn(6, layer.in_features)
    with torch.no_grad():
        y32 = final(x).double()
        for module in (final, _round_trip(final)):
            for cast, dtype in [(lambda mod: mod.to(torch.bfloat16), torch.bfloat16),
                                (lambda mod: mod.half(), torch.float16)]:
                moved = cast(_round_trip(module))
                for xm in (x[:1], x):  # decode and prefill
                    y = moved(xm.to(dtype))
                    assert y.dtype == dtype
                    assert _rel_err(y, y32[: xm.shape[0]]) <= 1e-2, (case, dtype)
                storage = getattr(moved, "storage", None)
                if storage is not None:
                    assert storage.dtype == dtype
                    if hasattr(storage, "scales"):
                        assert storage.scales.dtype == torch.float32
                    back = _round_trip(moved)  # a reload of the cast module keeps its dtype
                    assert back.storage.dtype == dtype
                    assert torch.equal(back(x.to(dtype)), moved(x.to(dtype)))
            back32 = _round_trip(module.to(torch.bfloat16)).float()
            assert _rel_err(back32(x), y32) <= 1e-2


def test_cast_keeps_scales_exact():
    st = _storages(37, 52, torch.float32)["q4_g13"]
    before = st.scales.clone()
    st.to(torch.float16)
    assert st.dtype == torch.float16 and torch.equal(st.scales, before)
    st.float()
    assert st.dtype == torch.float32 and torch.equal(st.scales, before)


@pytest.mark.parametrize("n, m, max_ratio", [(2, 4, 0.65), (1, 4, 0.35)])
def test_nm_plus_int8_stores_only_the_kept_codes(n, m, max_ratio):
    def finalized(config):
        layer = vk.VCONLinear(256, 64, config=config)
        layer.set_beta(0.0)
        return vk.finalize(nn.Sequential(layer))[0]

    int8 = finalized(vk.Quantize(bits=8))
    both = finalized(vk.Compose(vk.Prune(granularity="nm", n=n, m=m), vk.Quantize(bits=8)))
    assert isinstance(both.storage, NMQuantizedWeight)
    ratio = vk.storage_bytes(both) / vk.storage_bytes(int8)
    assert ratio <= max_ratio, ratio


def test_unstructured_prune_plus_int8_is_csr_of_codes():
    layer = vk.VCONLinear(256, 64, config=vk.Compose(vk.Prune(sparsity=0.9), vk.Quantize(bits=8)))
    layer.set_beta(0.0)
    x = torch.randn(3, 256)
    with torch.no_grad():
        y = layer(x)
        final = vk.finalize(nn.Sequential(layer))[0]
        assert isinstance(final.storage, SparseQuantizedWeight)
        assert _rel_err(final(x), y.double()) <= 1e-5
        assert torch.equal(final.storage.integer_codes().count_nonzero(), final.storage.codes.count_nonzero())


def test_bf16_prefill_on_worker_threads_under_inference_mode():
    """The bf16 prefill runs torch ops on OpenMP worker threads: they get the caller's inference mode."""
    st = _storages(64, 256, torch.bfloat16)["q8_g64"]
    x = torch.randn(40, 256).to(torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            y = matmul.compressed_linear(x, st)
    finally:
        torch.set_num_threads(threads)
    assert _rel_err(y, F.linear(x.double(), st.materialize().double())) <= 8e-3
