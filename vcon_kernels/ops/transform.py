"""In-register weight transforms: the blended weight of ``spec.py`` computed on one tile.

Every kernel that touches the weight (the fused GEMMs, the W_eff builder, the exact
gradient epilogue, the scale reduction) calls these helpers on a tile ``w`` (fp32) of the
(N, K) weight, with ``wr`` / ``wc`` the row and column index of every element (full tile
shape) and ``valid`` the in-bounds mask. The tile can be oriented either way (W^T tiles
in the forward GEMM, W tiles in the input-gradient GEMM): only the indices matter.

Transform state, passed flat (``*_ptr`` are device pointers, never host values, so
changing beta or the threshold never recompiles nor syncs):

* ``beta_ptr``: fp32 ``[beta_p, beta_q]`` (prune + quantize) or ``[beta]``.
* ``PRUNE``: 0 none; 1 an elementwise keep-mask, either the threshold
  ``|W| >= thr[row * thr_stride]`` (``thr_stride`` 0 per layer, 1 per row) or, when the
  runtime flag ``stored_mask`` is set, a stored bit-packed mask (``packing.py`` layout: bit
  ``k % 8`` of byte ``k // 8`` of the row); 2 N:M ranks computed from the ``nm_m`` weights
  of the element's group (no mask tensor).
* ``QUANT``: 0 none; 1 fake quantization, integer
  ``s * clamp(rne(W1 / s'), qmin, qmax)`` or, with the runtime flag ``binary``,
  ``s * sign(W1)``. The scale of element (r, c) is ``scale_ptr[r * scale_row_stride + c //
  group_size]`` (per tensor: row stride 0; per channel: row stride 1); the runtime flag
  ``scale_grouped`` marks per-group scales, the one case that needs a full-tile gather.
* ``NM_AXIS`` (constexpr): the tile axis that runs along W's columns, where N:M group mates
  can be read from registers: in the GEMMs with ``NM_GROUP`` / ``NM_KEEP`` (constexprs m and n:
  the tile reshaped into groups, :func:`nm_keep_reshaped`), in the elementwise kernels with
  ``tl.gather`` when the runtime flag ``nm_in_tile`` says groups are whole inside tiles; -1 (or
  neither): read back from memory.

Which choices are constexprs and which are runtime flags is a trade: constexprs give the
leanest code per mode, where it matters (``PRUNE`` / ``QUANT`` in the GEMM K loops); the
cheap, uniform choices (threshold vs stored bits, integer vs binary, per-group scales, N:M
from registers or memory, and the whole transform in the elementwise kernels and the dW
epilogue, which run once per element) are runtime values, so that fewer variants must be
compiled (the GPU JIT and the ahead-of-time check alike).

The math, in fp32 as the torch backend: ``W1 = where(M, W, beta_p W)``,
``W_eff = beta_q W1 + (1 - beta_q) Q(W1)``; exact-gradient coefficient
``where(M, 1, beta_p) * (beta_q + (1 - beta_q) R)`` with ``R = qmin <= rne(W1 / s') <= qmax``.
The quotient ``W1 / s'`` is the IEEE round-to-nearest one, as in torch, so the rounding
decisions are the same as the torch backend's, bit for bit: ``tl.math.div_rn`` in the elementwise
kernels, and in the GEMM main loops one reciprocal per W row (per-tensor / per-channel scales) or
per group (read beside the scale, :func:`group_recip`) plus two exact FMA corrections per element
(:func:`div_by_scale`: 6 instructions instead of div_rn's ~14 with its slow-path call).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .utils import round_half_even

PRUNE_NONE, PRUNE_ELEMENTWISE, PRUNE_NM_RANKS = 0, 1, 2
QUANT_NONE, QUANT_ON = 0, 1


@triton.jit
def load_row_state(thr_ptr, thr_stride, scale_ptr, scale_row_stride, group_size, scale_grouped,
                   rows, rows_ok, wr, wc, valid, PRUNE, QUANT):
    """(threshold, scale) for a tile, as small broadcastable loads where the state is per row or per layer.

    ``rows`` / ``rows_ok`` are the W-row indices in broadcastable form ([1, B] or [B, 1]); only
    per-group scales (runtime flag ``scale_grouped``) need a full-tile gather.
    """
    rows64 = rows.to(tl.int64)
    # Every branch yields the same type, so PRUNE / QUANT may be constexprs or runtime values.
    if PRUNE == 1:
        t = tl.load(thr_ptr + rows64 * thr_stride, mask=rows_ok, other=0.0)
    else:
        t = tl.zeros(rows.shape, tl.float32)
    if QUANT != 0:
        # (a runtime branch: both sides must give the same type, hence the broadcast)
        if scale_grouped != 0:
            s = tl.load(scale_ptr + wr.to(tl.int64) * scale_row_stride + wc // group_size, mask=valid, other=1.0)
        else:
            s = tl.broadcast_to(tl.load(scale_ptr + rows64 * scale_row_stride, mask=rows_ok, other=1.0), wr.shape)
    else:
        s = tl.full(wr.shape, 1.0, tl.float32)
    return t, s


@triton.jit
def _beats(key, kj, pos, J: tl.constexpr):
    """Whether group mate J outranks each element: ``k_J > k_i`` for J > i, ``not (k_i > k_J)`` for J < i
    (equal magnitudes: the lower index wins), False for J == i. One comparison per pair of mates."""
    return tl.where(pos == J, False, tl.where(pos < J, kj > key, (key > kj) == 0))


@triton.jit
def nm_keep_4(key, pos, GROUP_AXIS: tl.constexpr, NM_KEEP: tl.constexpr):
    """Keep-mask of 1:4, 2:4 and 3:4 with n a constexpr: "fewer than n of the 3 mates outrank me" is one
    3-input logic operation per element (NOR, NOT-majority, NAND) instead of a count."""
    c0 = _beats(key, tl.sum(tl.where(pos == 0, key, 0), axis=GROUP_AXIS, keep_dims=True), pos, 0)
    c1 = _beats(key, tl.sum(tl.where(pos == 1, key, 0), axis=GROUP_AXIS, keep_dims=True), pos, 1)
    c2 = _beats(key, tl.sum(tl.where(pos == 2, key, 0), axis=GROUP_AXIS, keep_dims=True), pos, 2)
    c3 = _beats(key, tl.sum(tl.where(pos == 3, key, 0), axis=GROUP_AXIS, keep_dims=True), pos, 3)
    if NM_KEEP == 1:
        out = (c0 | c1 | c2 | c3) == 0
    elif NM_KEEP == 2:
        out = ((c0 & c1) | (c0 & c2) | (c0 & c3) | (c1 & c2) | (c1 & c3) | (c2 & c3)) == 0
    else:
        out = ((c0 & c1 & c2) | (c0 & c1 & c3) | (c0 & c2 & c3) | (c1 & c2 & c3)) == 0
    return out


@triton.jit
def nm_keep_reshaped(a, nm_n, NM_AXIS: tl.constexpr, NM_GROUP: tl.constexpr, NM_KEEP: tl.constexpr):
    """N:M keep-mask of a tile ``a`` of |W| (fp32), groups of ``NM_GROUP`` mates along ``NM_AXIS``, n = ``nm_n``.

    The tile is reshaped so that each group is one axis of length ``NM_GROUP``; with the GEMM's
    blocked layouts (8 consecutive W columns per thread: the vectorized load) a group of up to 8
    sits in one thread's registers, so the mates are plain register reads: no ``tl.gather``
    shuffles, no runtime loop (which kept Triton's pipeliner off the whole K loop).

    Magnitudes are compared as the integer bit patterns of |w| (the same order for every non-NaN
    value; NaN above +inf, as ``torch.sort`` puts it). Being a total order, one comparison serves
    both elements of a pair: element i counts ``w_j > w_i`` for j > i and ``not (w_i > w_j)`` for
    j < i. The mate is picked out of the group with a masked integer sum (``x + 0`` folds away for
    ints, not floats).
    """
    if NM_AXIS == 0:
        a3 = tl.reshape(a, (a.shape[0] // NM_GROUP, NM_GROUP, a.shape[1]))
        pos = tl.arange(0, NM_GROUP)[None, :, None]
        GROUP_AXIS: tl.constexpr = 1
    else:
        a3 = tl.reshape(a, (a.shape[0], a.shape[1] // NM_GROUP, NM_GROUP))
        pos = tl.arange(0, NM_GROUP)[None, None, :]
        GROUP_AXIS: tl.constexpr = 2
    key = a3.to(tl.int32, bitcast=True)
    if NM_GROUP == 4 and NM_KEEP > 0 and NM_KEEP < 4:
        keep = nm_keep_4(key, pos, GROUP_AXIS, NM_KEEP)
    else:
        # rank = #{j: |w_j| > |w_i|} + #{j < i: |w_j| == |w_i|}; the j == i term below is always 1
        # (not (k > k)), hence the start at -1.
        rank = tl.full(a3.shape, -1, tl.int32)
        for j in tl.static_range(NM_GROUP):
            kj = tl.sum(tl.where(pos == j, key, 0), axis=GROUP_AXIS, keep_dims=True)
            rank += tl.where(pos < j, (kj > key).to(tl.int32), 1 - (key > kj).to(tl.int32))
        keep = rank < nm_n
    return tl.reshape(keep, a.shape)


@triton.jit
def keep_tile(a, t, wr, wc, valid, w_ptr, stride_wr, stride_wc, mask_ptr, mask_stride, stored_mask, nm_n, nm_m,
              nm_in_tile, PRUNE, NM_AXIS: tl.constexpr, NM_GROUP: tl.constexpr = 0,
              NM_KEEP: tl.constexpr = 0):
    """Keep-mask M of the prune stage for a tile of |W| (``a``, fp32; ``t`` the threshold).

    ``NM_GROUP`` (constexpr, the GEMM kernels): N:M groups of that many columns are whole inside
    the tile along ``NM_AXIS`` (``nm_m`` equals it, ``NM_KEEP`` is n); see :func:`nm_keep_reshaped`.
    """
    if PRUNE == 1:
        if stored_mask != 0:
            byte = tl.load(mask_ptr + wr.to(tl.int64) * mask_stride + wc // 8, mask=valid, other=0).to(tl.int32)
            keep = ((byte >> (wc % 8)) & 1) != 0
        else:
            keep = a >= t
    elif NM_GROUP > 0:
        keep = nm_keep_reshaped(a, nm_n, NM_AXIS, NM_GROUP, NM_KEEP)
    else:
        # rank = #{j: |w_j| > |w_i|} + #{j < i: |w_j| == |w_i|} over the element's group of nm_m.
        rank = tl.zeros_like(wc)
        in_tile = False
        if NM_AXIS >= 0:  # this kernel's tiles run along W's columns on axis NM_AXIS
            in_tile = nm_in_tile != 0
        if in_tile:
            # Groups are whole inside the tile (nm_m, a power of two, divides the tile and tiles
            # start at multiples of it): read the group mates from registers.
            local = wc % a.shape[NM_AXIS]
            first = local - wc % nm_m
            for j in range(0, nm_m):
                aj = tl.gather(a, first + j, axis=NM_AXIS)
                rank += ((aj > a) | ((aj == a) & (first + j < local))).to(rank.dtype)
        else:  # read them back from memory (L1/L2 hits on a GPU)
            first = wc - wc % nm_m
            row_ptr = w_ptr + wr.to(tl.int64) * stride_wr
            for j in range(0, nm_m):
                col = first + j
                aj = tl.abs(tl.load(row_ptr + col.to(tl.int64) * stride_wc, mask=valid, other=0.0).to(tl.float32))
                rank += ((aj > a) | ((aj == a) & (col < wc))).to(rank.dtype)
        keep = rank < nm_n
    return keep


@triton.jit
def row_state(thr_ptr, thr_stride, scale_ptr, scale_row_stride, rows, rows_ok, PRUNE, QUANT, rcp_ptr=None,
              LOAD_RCP: tl.constexpr = False):
    """(threshold, scale, :func:`row_scale`'s (lift, reciprocal, divisor)) at W rows ``rows`` (broadcastable),
    for every layout but per-group scales. ``LOAD_RCP``: the reciprocals are read from ``rcp_ptr`` (laid out
    as the scales, from :func:`scale_reciprocals_kernel`) instead of computed here."""
    if PRUNE == 1:
        t = tl.load(thr_ptr + rows.to(tl.int64) * thr_stride, mask=rows_ok, other=0.0)
    else:
        t = tl.zeros(rows.shape, tl.float32)
    if QUANT != 0:
        s, lift, r, b = row_scale(scale_ptr, scale_row_stride, rows, rows_ok, rcp_ptr, LOAD_RCP)
    else:
        s = tl.full(rows.shape, 1.0, tl.float32)
        lift = s
        r = s
        b = s
    return t, s, lift, r, b


@triton.jit
def row_scale(scale_ptr, scale_row_stride, rows, rows_ok, rcp_ptr=None, LOAD_RCP: tl.constexpr = False):
    """Per-tensor / per-channel scale ``s`` at W rows ``rows`` (broadcastable), with what
    :func:`div_by_scale` needs to divide by ``s'`` (s where s > 0, else 1) without a division per element:
    ``lift`` (1, or 2^64 where s' < 2^-100), the divisor ``b = s' lift`` and ``r = RN(1 / b)``, one IEEE
    division per row (or, ``LOAD_RCP``, a load from ``rcp_ptr``).

    The lift keeps the quotient's residual out of the subnormal range for tiny scales (max |W1| of
    the row below ~1e-28): W1 and s' are both multiplied by it, exactly, so the quotient is unchanged.
    """
    offs = rows.to(tl.int64) * scale_row_stride
    s = tl.load(scale_ptr + offs, mask=rows_ok, other=1.0)
    s_safe = tl.where(s > 0, s, 1.0)
    lift = tl.where(s_safe < 7.888609052210118e-31, 1.8446744073709552e19, 1.0)  # 2^-100, 2^64
    b = s_safe * lift
    if LOAD_RCP:
        r = tl.load(rcp_ptr + offs, mask=rows_ok, other=1.0)
    else:
        r = tl.math.div_rn(1.0, b)
    return s, lift, r, b


@triton.jit
def group_recip(rcp_ptr, s, scale_row_stride, group_size, wr, wc, valid):
    """:func:`row_scale`'s ``(lift, r, b)`` for per-group scales ``s`` (the full-tile gather of
    :func:`load_row_state`): ``r`` is read from ``rcp_ptr`` (:func:`scale_reciprocals_kernel`, laid out
    as the scales) with the same gather, so the GEMM main loops take no division per element for
    per-group scales either."""
    r = tl.load(rcp_ptr + wr.to(tl.int64) * scale_row_stride + wc // group_size, mask=valid, other=1.0)
    s_safe = tl.where(s > 0, s, 1.0)
    lift = tl.where(s_safe < 7.888609052210118e-31, 1.8446744073709552e19, 1.0)
    return lift, r, s_safe * lift


@triton.jit
def scale_reciprocals_kernel(scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """``out[i] = RN(1 / (s'_i lift_i))`` (:func:`row_scale`) for a contiguous scale tensor."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    _, _, r, _ = row_scale(scale_ptr, 1, offs, ok)
    tl.store(out_ptr + offs, r, mask=ok)


@triton.jit
def div_by_scale(w1, b, lift, r):
    """``RN(w1 / s')``, bit for bit as the IEEE division, from :func:`row_scale`'s ``lift``, ``b = s' lift``
    and ``r = RN(1 / b)``: 1 FMUL for the lift, 1 for the first quotient, 4 FMA per element, no division.

    With a = w1 lift and b (exact, same quotient): q0 = RN(a r) is within 1.5 ulp of
    a / b; one correction ``q + RN(a - b q) r`` makes it faithful (the residual's rounding and r's
    error add ~2^-24 ulp); with a faithful q the residual ``a - b q`` is exact in one FMA (b >= 2^-100:
    no underflow), and a second correction gives the correctly rounded quotient (Markstein's
    theorem: r correctly rounded, q faithful). Needs |w1 / s'| < 2^125 (no overflow), which the
    scales of the spec (s = max|W1| / qmax over the element's group) guarantee: |w1 / s'| <= qmax.
    The interpreter's fma rounds twice; ``utils.exact_interpreter_fma`` makes it a true FMA, as the GPU's.
    """
    a = w1 * lift
    q = a * r
    q = tl.math.fma(tl.math.fma(-b, q, a), r, q)
    return tl.math.fma(tl.math.fma(-b, q, a), r, q)


@triton.jit
def quant_codes(w1, s, binary, lift=1.0, r=1.0, b=1.0, RECIP: tl.constexpr = False):
    """Unclamped integer codes ``rne(W1 / s')`` (s' = s where s > 0, else 1), or sign(W1) for binary.

    ``RECIP``: ``lift`` / ``r`` / ``b`` come from :func:`row_scale` and the quotient takes no division.
    """
    if binary != 0:
        codes = tl.where(w1 > 0, 1.0, tl.where(w1 < 0, -1.0, 0.0))
    elif RECIP:
        codes = round_half_even(div_by_scale(w1, b, lift, r))
    else:
        codes = round_half_even(tl.math.div_rn(w1, tl.where(s > 0, s, 1.0)))
    return codes


@triton.jit
def load_beta(beta_ptr, i: tl.constexpr, w, BETA_AXIS: tl.constexpr):
    """``beta_ptr[i]``: a scalar, or (``BETA_AXIS`` 0 / 1) the same value loaded as a vector along that axis of
    the tile ``w``. In the GEMM main loops a scalar broadcast into the tile keeps Triton from moving the
    transform into wgmma's register-operand layout (its OptimizeDotOperands hoisting takes only loads and
    constants into the chain); a vector load does not (bench/SM90.md)."""
    if BETA_AXIS == 0:
        out = tl.load(beta_ptr + i + tl.zeros((w.shape[0], 1), tl.int32))
    elif BETA_AXIS == 1:
        out = tl.load(beta_ptr + i + tl.zeros((1, w.shape[1]), tl.int32))
    else:
        out = tl.load(beta_ptr + i)
    return out


@triton.jit
def transform_tile(w, t, s, wr, wc, valid, w_ptr, stride_wr, stride_wc, beta_ptr, mask_ptr, mask_stride,
                   stored_mask, nm_n, nm_m, nm_in_tile, binary, qmin, qmax,
                   PRUNE, QUANT, COEF: tl.constexpr, NM_AXIS: tl.constexpr, NM_GROUP: tl.constexpr = 0,
                   NM_KEEP: tl.constexpr = 0, lift=1.0, r=1.0, RECIP: tl.constexpr = False,
                   BETA_AXIS: tl.constexpr = -1, b=1.0):
    """W_eff of the tile (``COEF=False``) or the exact-gradient coefficient dW_eff/dW (``COEF=True``), fp32.

    ``t`` / ``s``: threshold and scale from :func:`load_row_state`; ``RECIP``: ``lift`` / ``r`` / ``b`` from
    :func:`row_scale` (no division per element); ``BETA_AXIS``: see :func:`load_beta`. ``PRUNE`` / ``QUANT`` are
    constexprs in the GEMM main loops (one lean variant per mode) and runtime values in the
    elementwise kernels and the dW epilogue (one variant for all modes; the branches are uniform).
    """
    w1 = w
    coef = tl.full(w.shape, 1.0, tl.float32)
    if PRUNE != 0:
        bp = load_beta(beta_ptr, 0, w, BETA_AXIS)
        keep = keep_tile(tl.abs(w), t, wr, wc, valid, w_ptr, stride_wr, stride_wc, mask_ptr, mask_stride,
                         stored_mask, nm_n, nm_m, nm_in_tile, PRUNE, NM_AXIS, NM_GROUP, NM_KEEP)
        w1 = tl.where(keep, w, bp * w)
        if COEF:
            coef = tl.where(keep, 1.0, bp)
    if QUANT != 0:
        if PRUNE != 0:
            bq = load_beta(beta_ptr, 1, w, BETA_AXIS)
        else:
            bq = load_beta(beta_ptr, 0, w, BETA_AXIS)
        codes = quant_codes(w1, s, binary, lift, r, b, RECIP)
        if COEF:
            if binary == 0:  # binary passes the gradient straight through: no factor at all
                in_range = ((codes >= qmin) & (codes <= qmax)).to(tl.float32)
                coef = coef * (bq + (1 - bq) * in_range)
        else:
            if binary == 0:
                codes = tl.minimum(tl.maximum(codes, qmin), qmax)
            w1 = bq * w1 + (1 - bq) * (codes * s)
    if COEF:
        return coef
    return w1
