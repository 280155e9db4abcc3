"""Where the time of a finalized layer's prefill goes, at MiniLM's layer shapes.

MiniLM (96 sentences x 48 tokens = 4608 rows) has three linear shapes: 384 -> 384 (q, k, v,
attention output), 384 -> 1536 (intermediate) and 1536 -> 384 (output). For each, and each
format, this times side by side (interleaved rounds, medians of per-round ratios to dense):

* ``dense``: ``nn.Linear`` (what the finalized layer replaces; its bias goes into the GEMM);
* ``dense_nobias``: ``F.linear(x, W)`` (the GEMM alone);
* ``final``: the finalized module (``CompressedLinear.forward``: Python wrapper, C++ op, bias);
* ``op``: ``_C.infer_linear`` called directly (no wrapper, no bias), whole weight when it
  fits ``matmul.WHOLE_MAX_BYTES``;
* ``op_blocked``: the same, forced onto the blocked dequantize + per-block GEMM path;
* ``dequant``: ``_C.infer_linear`` at M = 9, the smallest prefill batch (dequantize + a tiny
  GEMM: the dequantize's cost, which the prefill pays once per call whatever M).

Example usage::

    python bench/profile_prefill.py --threads 1 --clock cpu --rounds 9
    python bench/profile_prefill.py --shapes 4608x384x1536 --formats int8_channel
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import measure_interleaved  # noqa: E402
from bench_infer import FORMATS  # noqa: E402
from bench_infer import finalized_layer  # noqa: E402

from vcon_kernels.compressed import matmul  # noqa: E402

MINILM_SHAPES = ["4608x384x384", "4608x384x1536", "4608x1536x384"]


def _op(final, x, whole_max_bytes=None):
    storage = final.storage
    fmt, a, b, crow, scales, bits, qmin, group_size, n, m, index_bits = storage.infer_args()
    whole = matmul.WHOLE_MAX_BYTES if whole_max_bytes is None else whole_max_bytes

    def run():
        matmul._C.infer_linear(x, fmt, a, b, crow, scales, storage.shape[0], bits, qmin, group_size, n, m,
                               index_bits, matmul.DECODE_MAX_M[x.dtype], None, whole)
    return run


def profile(shape: str, fmt: str, args) -> dict:
    m, k, n = (int(v) for v in shape.split("x"))
    dense, final = finalized_layer(fmt, k, n, torch.float32)
    x = torch.randn(m, k)
    x9 = torch.randn(9, k)

    def call(fn):
        def run():
            with torch.inference_mode():
                fn()
        return run

    fns = {
        "dense": call(lambda: dense(x)),
        "dense_nobias": call(lambda: F.linear(x, dense.weight)),
        "final": call(lambda: final(x)),
        "op": call(_op(final, x)),
        "op_blocked": call(_op(final, x, 0)),
        "dequant": call(_op(final, x9)),
    }
    return measure_interleaved(fns, rounds=args.rounds, min_time_s=0.05, clock=args.clock)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=MINILM_SHAPES, help="MxKxN")
    parser.add_argument("--formats", nargs="+", default=["int8_channel", "int4_group32", "nm_2_4", "csr_90"],
                        choices=[f for f in FORMATS if f != "lowrank_r128"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, clock {args.clock}, load {os.getloadavg()[0]:.1f}")
    print("shape format: dense ms | ratios to dense: dense_nobias final op op_blocked dequant(M=9)")
    for shape in args.shapes:
        for fmt in args.formats:
            st = profile(shape, fmt, args)
            ratios = "  ".join(f"{name} {st[name]['ratio_to_dense']:.3f}" for name in
                               ("dense_nobias", "final", "op", "op_blocked", "dequant"))
            print(f"{shape} {fmt}: dense {st['dense']['median']:.2f} ms | {ratios}", flush=True)
    print(f"load after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
