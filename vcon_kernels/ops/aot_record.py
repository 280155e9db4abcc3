"""Record the kernel launches a real model makes, on CPU tensors, for the ahead-of-time compile check.

Nothing runs: ``utils.capture_launches`` keeps ``(kernel, kwargs)`` instead of launching. The
launchers are called over every compression mode x dtype x gradient mode x strategy x bias,
at one shape per *specialization class* of a real layer. The GPU JIT compiles one program
per class, not per shape: an int argument is specialized only by "== 1" (a constexpr) and
"divisible by 16" (``tt.divisibility=16``), a pointer only by 16-byte alignment. So:

* ``"tokens"``: M = 32, K = 2048, N = 256, rank 16 stands for a training or prefill batch of a
  real layer (M = 512 or 8192, K = N = 4096, rank 64): every size and stride is a multiple
  of 16 in both, so the same programs are compiled (``tests/test_aot.py`` checks this
  equivalence against a 4096 x 4096 layer for the fused strategy).
* ``"decode"``: M = 1 (one token): M becomes a constexpr, a separate program.
* ``"odd"``: M = 70, K = 52 or 48 (what the mode allows), N = 37, rank 5: a layer whose
  sizes are not multiples of 16 (masked edges, no divisibility hints).

Example usage::

    records = record_launches(dtypes=(torch.bfloat16,))   # [(kernel, kwargs), ...]
"""

from __future__ import annotations

import torch

# name -> (M, N, K for the modes that allow any K, K for N:M and groups, rank); quantization groups
# are 128 wide (as real ones) or 4 ("odd": K = 52). K = 2048 because the launchers size some blocks
# by the row length up to 2048 (group reductions; the per-row threshold's row lengths up to 16384 are
# recorded separately, ``record_threshold_launches``).
SHAPES = {
    "tokens": (32, 256, 2048, 2048, 16),
    "decode": (1, 256, 2048, 2048, 16),
    "odd": (70, 37, 53, 52, 5),
}


def cases():
    """(name, config factory taking (grad, group size), needs a structured K): one per mode and granularity."""
    from .. import configs as c

    return [
        ("prune_layer", lambda g, gs: c.Prune(sparsity=0.6, grad=g), False),
        ("prune_row", lambda g, gs: c.Prune(sparsity=0.3, granularity="row", grad=g), False),
        ("prune_nm", lambda g, gs: c.Prune(granularity="nm", n=2, m=4, grad=g), True),
        ("prune_once", lambda g, gs: c.Prune(sparsity=0.6, update="once", grad=g), False),
        ("int8_channel", lambda g, gs: c.Quantize(bits=8, grad=g), False),
        ("int4_group", lambda g, gs: c.Quantize(bits=4, granularity="group", group_size=gs, grad=g), True),
        ("int2_tensor", lambda g, gs: c.Quantize(bits=2, granularity="tensor", grad=g), False),
        ("binary_tensor", lambda g, gs: c.Quantize(bits=1, granularity="tensor", grad=g), False),
        ("binary_channel", lambda g, gs: c.Quantize(bits=1, granularity="channel", grad=g), False),
        ("prune_int4", lambda g, gs: c.Compose(c.Prune(sparsity=0.5, grad=g), c.Quantize(bits=4, grad=g)), False),
        ("nm_int8_group", lambda g, gs: c.Compose(c.Prune(granularity="nm", grad=g),
                                              c.Quantize(bits=8, granularity="group", group_size=gs, grad=g)), True),
        ("nm_mask_int8", lambda g, gs: c.Compose(c.Prune(granularity="nm", update="once", grad=g),
                                             c.Quantize(bits=8, grad=g)), True),
        ("nm_3_6", lambda g, gs: c.Prune(granularity="nm", n=3, m=6, grad=g), True),  # m not a power of 2
        ("prune_binary", lambda g, gs: c.Compose(c.Prune(sparsity=0.8, grad=g), c.Quantize(bits=1, grad=g)), False),
        ("lowrank", None, False),
    ]


def _layer(name, factory, structured, shape, grad, dtype):
    from .. import configs as c
    from ..modules import VCONLinear

    m, n, k_any, k_struct, rank = SHAPES[shape]
    k = k_struct if structured else k_any
    if name == "nm_3_6":
        k = 48 if shape == "odd" else 2016  # a multiple of 6 (and of 16 where the shape is "tokens")
    config = c.LowRank(rank=rank, grad=grad) if factory is None else factory(grad, 4 if shape == "odd" else 128)
    torch.manual_seed(0)
    return VCONLinear(k, n, config=config, dtype=dtype), m


def record_layer(layer, m: int, strategies=None, biases=(True, False)) -> list:
    """The launches of one layer: state (threshold, scales, W_eff, exact coefficient), forward, backward."""
    from . import dispatch
    from .blend_weight import blend_weight
    from .linear_backward import linear_backward
    from .linear_forward import linear_forward
    from .scales import quant_scales
    from .threshold import prune_threshold
    from .utils import capture_launches
    from .weight_grad import weight_grad
    from .weight_state import WeightState

    spec, w, beta = layer.spec(), layer.weight.detach(), layer.beta
    n, k = w.shape
    thr = torch.zeros(spec.threshold_shape(n), dtype=torch.float32)
    scales = torch.ones(spec.scales_shape(n, k), dtype=torch.float32)
    u = v = None
    if spec.lowrank:
        u, v = layer.lowrank_u.detach(), layer.lowrank_v.detach()
    records: list = []
    with capture_launches(records):
        if spec.has_prune and spec.prune == 1:
            prune_threshold(w, spec.sparsity, spec.per_row)
        state = WeightState(w, beta, thr, scales, layer.mask, spec)
        if spec.has_quant:
            quant_scales(state)
        if spec.has_prune or spec.has_quant:
            blend_weight(state)
            weight_grad(torch.ones_like(w), state)
        x = torch.ones(m, k, dtype=w.dtype)
        for strategy in strategies or dispatch.STRATEGIES:
            with dispatch.force(strategy):
                for with_bias in biases:
                    bias = layer.bias.detach() if with_bias else None
                    y = linear_forward(x, w, bias, beta, thr, scales, layer.mask, u, v, spec)
                    linear_backward(y, x, w, bias, beta, thr, scales, layer.mask, u, v, spec, (True,) * 4)
    return records


def record_launches(dtypes=(torch.float32, torch.bfloat16, torch.float16), shapes=tuple(SHAPES)) -> list:
    """Every ``(kernel, kwargs, origin)`` the Triton ops launch, over modes x dtypes x grads x shapes x
    strategies x bias; ``origin`` names the case, gradient mode and shape (``"int8_channel/ste/tokens"``)."""
    records: list = []
    for name, factory, structured in cases():
        for dtype in dtypes:
            for grad in ("ste", "exact"):
                for shape in shapes:
                    layer, m = _layer(name, factory, structured, shape, grad, dtype)
                    records += [(kern, kw, f"{name}/{grad}/{shape}") for kern, kw in record_layer(layer, m)]
    records += record_threshold_launches(dtypes)
    # finalized layers' GEMM (dequant_matmul.py): its own shapes, one variant per storage format
    return records + record_dequant_launches(dtypes, tuple(s for s in shapes if s in DEQUANT_SHAPES))


# Row lengths of the per-row threshold (ops/threshold.py): one program per row block (1024 .. 16384, the
# row's next power of two) and the re-read-per-bit program of longer rows, each with a row length that
# is a multiple of 16 and one that is not (the JIT specializes the length and the row stride by that).
THRESHOLD_ROW_LENGTHS = (1000, 1024, 2040, 2048, 4000, 4096, 8000, 8192, 16000, 16384, 16401, 16416)


def record_threshold_launches(dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> list:
    """``(kernel, kwargs, origin)`` of the magnitude threshold at every row-length class, per layer and per row."""
    from .threshold import prune_threshold
    from .utils import capture_launches

    records: list = []
    for dtype in dtypes:
        for cols in THRESHOLD_ROW_LENGTHS:
            w = torch.zeros(16, cols, dtype=dtype)
            for per_row in (False, True):
                launches: list = []
                with capture_launches(launches):
                    prune_threshold(w, 0.5, per_row)
                records += [(kern, kw, f"threshold_{'row' if per_row else 'layer'}/{cols}") for kern, kw in launches]
    return records


def dequant_storages(rows: int, cols: int, dtype) -> dict:
    """One finalized storage per Triton dequant-GEMM format variant (``dequant_matmul.py``), zero codes."""
    from ..compressed import NMQuantizedWeight
    from ..compressed import NMSparseWeight
    from ..compressed import QuantizedWeight
    from ..spec import TransformSpec

    group = 128 if cols % 128 == 0 else 4
    codes = torch.zeros(rows, cols)
    out = {}
    for bits, gs, tag in [(8, cols, "channel"), (8, group, "group"), (4, group, "group"), (4, cols, "channel"),
                          (2, 0, "tensor"), (1, 0, "tensor"), (1, cols, "channel")]:
        spec = TransformSpec(bits=bits, group_size=gs)
        out[f"q{bits}_{tag}"] = QuantizedWeight(codes, torch.ones(spec.scales_shape(rows, cols)), spec, dtype)
    if cols % 96 == 0:  # groups straddling the K steps of 64
        spec = TransformSpec(bits=4, group_size=96)
        out["q4_group96"] = QuantizedWeight(codes, torch.ones(spec.scales_shape(rows, cols)), spec, dtype)
    out["q1_channel_zeros"] = QuantizedWeight(codes, torch.ones(rows, 1), TransformSpec(bits=1, group_size=cols),
                                              dtype)  # all codes 0: the non-zero bit plane is stored
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
    keep[..., :2] = True
    keep = keep.reshape(rows, cols)
    out["nm_2:4"] = NMSparseWeight(torch.ones(rows, cols, dtype=dtype), keep, 2, 4)
    for gs, tag in [(cols, "channel"), (group, "group")]:
        spec = TransformSpec(bits=8, group_size=gs)
        out[f"nmq_2:4_{tag}"] = NMQuantizedWeight(codes, keep, 2, 4, torch.ones(spec.scales_shape(rows, cols)),
                                                  spec, dtype)
    if cols % 6 == 0:
        keep6 = torch.zeros(rows, cols // 6, 6, dtype=torch.bool)
        keep6[..., :3] = True
        out["nm_3:6"] = NMSparseWeight(torch.ones(rows, cols, dtype=dtype), keep6.reshape(rows, cols), 3, 6)
    return out


# Shapes of the dequant GEMM's launches: (M, N, K); "tokens" and "decode" specialize like K = N = 4096.
DEQUANT_SHAPES = {"tokens": (32, 256, 1536), "decode": (1, 256, 1536), "odd": (70, 37, 48)}


def record_dequant_launches(dtypes=(torch.float32, torch.bfloat16, torch.float16), shapes=tuple(DEQUANT_SHAPES)):
    """``(kernel, kwargs, origin)`` of the finalized layers' Triton GEMM: every format x dtype x shape x bias."""
    from .dequant_matmul import dequant_linear
    from .dequant_matmul import dequantize
    from .utils import capture_launches

    records: list = []
    for shape in shapes:
        m, n, k = DEQUANT_SHAPES[shape]
        for dtype in dtypes:
            for name, storage in dequant_storages(n, k, dtype).items():
                x = torch.ones(m, k, dtype=dtype)
                for bias in (torch.ones(n, dtype=dtype), None):
                    launches: list = []
                    with capture_launches(launches):
                        dequant_linear(x, storage, bias)
                    records += [(kern, kw, f"dequant_{name}/{shape}") for kern, kw in launches]
                if shape != "decode":  # the one-pass dequantize of large batches (dequant_linear's DENSE_MIN_M)
                    launches = []
                    with capture_launches(launches):
                        dequantize(storage)
                    records += [(kern, kw, f"dequantize_{name}/{shape}") for kern, kw in launches]
    return records
