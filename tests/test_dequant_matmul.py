"""The Triton weight-only GEMM of finalized layers (ops/dequant_matmul.py) and its CUDA routing.

Interpreted on CPU (TRITON_INTERPRET=1, conftest.py): every storage format the kernel reads, odd
shapes (N, K not multiples of the tiles, quantization groups that straddle K steps, N:M with m
not a power of two), fp32 / bf16 / fp16, against ``F.linear(x, storage.materialize(), bias)`` and
a float64 reference; an identity input checks that every rebuilt weight element is bit-exact.
``compressed_linear`` routing is checked by letting CPU tensors take the CUDA branch
(``matmul.TRITON_DEVICES``), and the sm_90 compile of every autotune config in a subprocess.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import triton  # noqa: F401  (a missing Triton fails this module, it does not skip it)
from cases import LINEAR_CASES
from cases import make_linear
from triton_helpers import DEVICE
from triton_helpers import TOL
from triton_helpers import no_tf32

import vcon_kernels as vk
from vcon_kernels.compressed import NMQuantizedWeight
from vcon_kernels.compressed import NMSparseWeight
from vcon_kernels.compressed import QuantizedWeight
from vcon_kernels.compressed import SparseQuantizedWeight
from vcon_kernels.compressed import SparseWeight
from vcon_kernels.compressed import matmul
from vcon_kernels.compressed.modules import CompressedLinear
from vcon_kernels.ops import dequant_matmul
from vcon_kernels.spec import TransformSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL64 = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}  # relative error vs float64


@pytest.fixture(autouse=True)
def full_fp32():
    with no_tf32():
        yield


@pytest.fixture
def tiles():
    """Set the interpreter's tile sizes (BLOCK_M, BLOCK_N, BLOCK_K) for one test."""
    def use(bm, bn, bk):
        dequant_matmul.TILE_OVERRIDE.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    yield use
    dequant_matmul.TILE_OVERRIDE.clear()


def _codes(shape, bits, gen, zeros=0.0):
    if bits == 1:
        c = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
    else:
        c = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=gen).float()
    if zeros:
        c = c * (torch.rand(shape, generator=gen) >= zeros)
    return c


def _scales(rows, cols, group_size, gen):
    return torch.rand(TransformSpec(bits=8, group_size=group_size).scales_shape(rows, cols), generator=gen) + 0.05


def _nm_keep(rows, cols, n, m, gen):
    order = torch.rand(rows, cols // m, m, generator=gen).argsort(-1)[..., :n]
    return torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)


def storages(rows, cols, dtype, seed=0):
    """Every format variant the kernel has a code path for, at (rows, cols); cols a multiple of 4."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    groups = sorted({0, cols, cols // 4, *(g for g in (8, 16, 24, 32) if cols % g == 0)})
    for bits in (8, 4, 2, 1):
        for group in (groups if bits in (8, 4) else (0, cols, cols // 4)):
            spec = TransformSpec(bits=bits, group_size=group)
            zeros = 0.3 if bits == 1 and group == cols // 4 else 0.0  # binary with exact zeros: non-zero bits
            out[f"q{bits}_g{group}"] = QuantizedWeight(_codes((rows, cols), bits, gen, zeros),
                                                       _scales(rows, cols, group, gen), spec, dtype)
    w = (torch.randn(rows, cols, generator=gen) * 2).to(dtype)
    for n, m in [(2, 4), (1, 4), (4, 8), (2, 8), (3, 6)]:
        if cols % m:
            continue
        out[f"nm{n}:{m}"] = NMSparseWeight(w, _nm_keep(rows, cols, n, m, gen), n, m)
        for bits, group in [(8, cols // 4), (4, 0)]:
            spec = TransformSpec(bits=bits, group_size=group)
            keep = _nm_keep(rows, cols, n, m, gen)
            out[f"nmq{n}:{m}_q{bits}_g{group}"] = NMQuantizedWeight(
                _codes((rows, cols), bits, gen) * keep, keep, n, m, _scales(rows, cols, group, gen), spec, dtype)
    return out


def _rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# Tiles: several programs and K steps per dimension; groups of 8/16 inside a step of 32 or 64,
# groups of 24 / cols // 4 straddling steps, N:M 4:8 / 2:8 with whole-byte indices only for some.
@pytest.mark.parametrize("rows, cols, dtype, tile", [
    (37, 52, torch.float32, (64, 32, 32)), (37, 52, torch.bfloat16, (64, 32, 32)),
    (37, 52, torch.float16, (64, 32, 32)), (21, 96, torch.float32, (16, 16, 64)),
    (21, 96, torch.bfloat16, (64, 32, 32)), (21, 96, torch.float16, (16, 16, 64)),
], ids=str)
def test_every_format_matches_materialize_and_float64(rows, cols, dtype, tile, tiles):
    tiles(*tile)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(rows, generator=gen).to(dtype)
    for name, st in storages(rows, cols, dtype).items():
        assert dequant_matmul.supports(st), name
        w = st.materialize()
        for m in (1, 33):
            x = torch.randn(m, cols, generator=gen).to(dtype)
            b = bias if m == 1 or rows == 37 else None
            y = dequant_matmul.dequant_linear(x.to(DEVICE), st.to(DEVICE), None if b is None else b.to(DEVICE)).cpu()
            assert y.dtype == dtype and y.shape == (m, rows), name
            same = F.linear(x, w, b)  # the path it replaces, in the activation dtype
            # accumulation order only: a few ulps of the largest output (fp32 too: codes up to 127 x scale)
            atol = {torch.float32: 3e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
            torch.testing.assert_close(y.float(), same.float(), rtol=TOL[dtype]["rtol"],
                                       atol=atol * max(1.0, float(same.float().abs().max())),
                                       msg=lambda e, name=name, m=m: f"{name} M={m}: {e}")
            ref = F.linear(x.double(), w.double(), None if b is None else b.double())
            assert _rel_err(y, ref) <= TOL64[dtype], (name, m, _rel_err(y, ref))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rebuilt_weight_is_bit_exact(dtype, tiles):
    # x = I: every output is one weight element times 1 plus exact zeros, whatever the accumulation order.
    tiles(128, 32, 32)
    rows, cols = 19, 96
    eye = torch.eye(cols, dtype=dtype)
    for name, st in storages(rows, cols, dtype, seed=3).items():
        y = dequant_matmul.dequant_linear(eye.to(DEVICE), st.to(DEVICE)).cpu()
        assert torch.equal(y, st.materialize().t()), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_batches_take_the_one_pass_dequantize(dtype, monkeypatch):
    """From DENSE_MIN_M rows: W rebuilt by one kernel (== materialize() bit for bit), then F.linear."""
    monkeypatch.setattr(dequant_matmul, "DEQUANTIZE_BLOCK", (16, 32))  # several programs per dimension
    monkeypatch.setattr(dequant_matmul, "DENSE_MIN_M", 3)
    gen = torch.Generator().manual_seed(4)
    bias = torch.randn(37, generator=gen).to(dtype)
    for name, st in storages(37, 52, dtype, seed=4).items():
        w = st.materialize()
        assert torch.equal(dequant_matmul.dequantize(st.to(DEVICE)).cpu(), w), name
        x = torch.randn(5, 52, generator=gen).to(dtype)
        y = dequant_matmul.dequant_linear(x.to(DEVICE), st.to(DEVICE), bias.to(DEVICE)).cpu()
        assert torch.equal(y, F.linear(x.to(DEVICE), w.to(DEVICE), bias.to(DEVICE)).cpu()), name


@pytest.mark.parametrize("case", sorted(c for c in LINEAR_CASES if c != "lowrank"))
def test_finalized_layers_route_to_the_kernel(case, monkeypatch):
    """A CUDA-like call (CPU tensors allowed into the CUDA branch) runs the kernel and matches materialize."""
    layer = make_linear(case)
    final = vk.finalize(torch.nn.Sequential(layer), force=True)[0]
    assert isinstance(final, CompressedLinear)
    calls = []
    original = dequant_matmul.dequant_linear

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(dequant_matmul, "dequant_linear", spy)
    monkeypatch.setattr(matmul, "TRITON_DEVICES", ("cpu", "cuda"))
    x = torch.randn(2, 3, final.in_features)
    expected = F.linear(x, final.storage.materialize(), final.bias)
    with torch.no_grad():
        y = final.to(DEVICE)(x.to(DEVICE)).cpu()
    kernel = dequant_matmul.supports(final.storage)
    assert len(calls) == int(kernel), (case, type(final.storage).__name__)
    assert y.shape == (2, 3, final.out_features)
    torch.testing.assert_close(y, expected, atol=3e-5, rtol=2e-5)


def test_routing_conditions(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    st = QuantizedWeight(_codes((21, 52), 4, gen), _scales(21, 52, 13, gen), TransformSpec(bits=4, group_size=13),
                         torch.float32)
    x = torch.randn(3, 52)
    bias = torch.randn(21)
    assert not matmul._triton_ok(x, st, bias)  # default: CUDA only
    monkeypatch.setattr(matmul, "TRITON_DEVICES", ("cpu",))
    assert matmul._triton_ok(x, st, bias)
    assert not matmul._triton_ok(x.double(), st, bias)  # dtype differs from the storage's
    assert not matmul._triton_ok(x, st, bias.half())
    assert not matmul._triton_ok(x.requires_grad_(), st, bias)  # autograd: the plain, differentiable path
    with torch.no_grad():
        assert matmul._triton_ok(x, st, bias)
    x = x.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not matmul._triton_ok(x, st, bias)
    keep = torch.rand(21, 52, generator=gen) > 0.8
    assert not matmul._triton_ok(x, SparseWeight(torch.randn(21, 52), keep), bias)  # CSR: materialize
    csrq = SparseQuantizedWeight(_codes((21, 52), 8, gen) * keep, keep, _scales(21, 52, 0, gen),
                                 TransformSpec(bits=8, group_size=0), torch.float32)
    assert not matmul._triton_ok(x, csrq, bias)
    # a bias that needs its gradient is added after the kernel, and gets it
    bias.requires_grad_()
    y = matmul.compressed_linear(x, st, bias)
    y.sum().backward()
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 3.0))
    torch.testing.assert_close(y, F.linear(x, st.materialize(), bias), atol=3e-5, rtol=2e-5)


def test_no_host_reads_on_the_kernel_path(monkeypatch):
    """The routed call reads no tensor value on the host (what would sync a GPU): those methods raise."""
    gen = torch.Generator().manual_seed(6)
    sts = storages(21, 52, torch.float32, seed=6)
    x = torch.randn(4, 52, generator=gen)
    expected = {name: F.linear(x, st.materialize()) for name, st in sts.items()}
    monkeypatch.setattr(matmul, "TRITON_DEVICES", ("cpu",))

    def host_read(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    # Only the launcher's own code must not read values; the interpreter itself copies tensors to numpy.
    for method in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, method, host_read)
    out = {name: matmul.compressed_linear(x, st) for name, st in sts.items()}
    monkeypatch.undo()
    for name, y in out.items():
        torch.testing.assert_close(y, expected[name], atol=3e-5, rtol=2e-5, msg=name)


def test_bad_input_names_the_argument():
    gen = torch.Generator().manual_seed(7)
    st = QuantizedWeight(_codes((5, 32), 8, gen), _scales(5, 32, 0, gen), TransformSpec(bits=8), torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        dequant_matmul.dequant_linear(torch.randn(2, 32), st)
    with pytest.raises(ValueError, match=r"x must be \(M, 32\)"):
        dequant_matmul.dequant_linear(torch.randn(2, 31, dtype=torch.bfloat16), st)
    keep = torch.rand(5, 32, generator=gen) > 0.5
    with pytest.raises(ValueError, match="no Triton kernel; supported"):
        dequant_matmul.dequant_linear(torch.randn(2, 32), SparseWeight(torch.randn(5, 32), keep))
    assert dequant_matmul.dequant_linear(torch.randn(0, 32, dtype=torch.bfloat16), st).shape == (0, 5)


def test_benchmark_script_runs_at_a_tiny_size(tmp_path):
    """bench/bench_gpu_infer.py --dry-run: every format and timing step once, interpreted, CSV written."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_gpu_infer.py"), "--dry-run",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = (tmp_path / "bench_gpu_infer.csv").read_text().splitlines()
    assert rows[0].startswith("dtype,format,M,") and len(rows) > 8, rows[:3]
    assert "nan" not in "".join(rows[1:]), rows


def _python_compile(tmp_path, code: str, timeout=900):
    script = tmp_path / "check.py"  # a file: @triton.jit needs the source
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, TRITON_INTERPRET="0", VCON_TRITON_AUTOTUNE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.slow
def test_every_tile_config_compiles_for_sm90(tmp_path):
    """Each format variant (bf16, the real-layer specialization class) x every autotune config and default,
    and the fp32 / fp16 variants of every shape class at one config (rotating), compile to an sm_90 cubin
    specialized as the GPU JIT would (ops/aot_compile.py). ``python -m vcon_kernels.ops.aot --arch 90
    --match _dequant`` compiles the full matrix."""
    out = _python_compile(tmp_path, """
        import torch
        from vcon_kernels.ops import aot, aot_record
        found_all = aot.variants(aot_record.record_dequant_launches())
        found = [v for v in found_all if v["fn"].__name__ == "_dequant_matmul_kernel"]
        jobs = aot.jobs(found, archs=(90,))
        # the one-pass dequantize (one fixed config): every format, bf16, both shape classes
        onepass = [j for j in aot.jobs([v for v in found_all if v["fn"].__name__ == "_dequantize_kernel"], archs=(90,))
                   if "bf16" in j["label"]]
        assert len(onepass) >= 20, len(onepass)
        from vcon_kernels.ops import dequant_matmul
        every = {f"BM{r[0]}xBN{r[1]}xBK{r[2]}_w{r[3]}s{r[4]}" for r in dequant_matmul.GPU_CONFIGS
                 + [dequant_matmul.DEFAULT_DECODE, dequant_matmul.DEFAULT_PREFILL]}
        assert {j["config"] for j in jobs} == {c[0] for c in found[0]["configs"]} == every
        full = [j for j in jobs if "bf16" in j["label"] and "/tokens" in j["label"] and "has_bias=1" in j["label"]]
        formats = {j["variant"]["origin"].split("/")[0] for j in full}
        assert len(formats) >= 12, formats
        rotated = [j for j in jobs if "bf16" not in j["label"] and "has_bias=1" in j["label"]
                   and j["column"] == j["index"] % len(j["variant"]["configs"])]
        todo = {id(j): j for j in full + rotated + onepass}.values()
        results = aot.run_jobs(list(todo), out=lambda line: None)
        failed = [(r[0]["label"], r[2]) for r in results if isinstance(r[2], Exception)]
        assert not failed, failed[:3]
        print("compiled", len(results), "formats", len(formats), "variants", len(found))
    """)
    assert "compiled" in out, out
