// Shared declarations of the vcon_kernels C++ CPU extension (vcon_kernels._C).
//
// Layout of the extension (one concept per file):
//   vcon.h            this file: the flat spec, the per-row kernel arguments, the kernel table
//   kernels.h         the vectorized per-row kernels (blend, exact-gradient coefficient,
//                     scale statistics), written once with at::vec::Vectorized
//   kernels_default.cpp / kernels_avx2.cpp
//                     kernels.h compiled twice: baseline ISA and AVX2+FMA (runtime dispatch)
//   select.cpp        k-th largest |W| (magnitude thresholds) by radix select on the float bits
//   ops.cpp           tensor-level ops: compute_state, blend_weight, weight_grad
//   linear.cpp        the blended linear layer: workspace, addmm, low rank
//   module.cpp        the Python bindings
//
// The math is the normative definition of vcon_kernels/spec.py; the plain-torch
// vcon_kernels/transforms.py is the oracle the tests compare against.
#pragma once

#include <cstdint>

namespace vcon {

// Mirrors vcon_kernels.spec (PRUNE_*).
enum PruneKind : int { PRUNE_NONE = 0, PRUNE_THRESHOLD = 1, PRUNE_NM = 2, PRUNE_MASK = 3 };

// The flat TransformSpec, as the Python side passes it (same fields, same order).
struct Spec {
  int prune = PRUNE_NONE;
  double sparsity = 0.0;
  bool per_row = false;
  int nm_n = 0;
  int nm_m = 0;
  int bits = 0;
  int64_t group_size = 0;  // 0 = one scale for the whole tensor
  bool exact = false;
  bool lowrank = false;

  bool has_prune() const { return prune != PRUNE_NONE; }
  bool has_quant() const { return bits != 0; }
  int num_stages() const { return (has_prune() && has_quant()) ? 2 : 1; }
  int quant_beta_index() const { return has_prune() ? 1 : 0; }
  int qmax() const { return bits > 1 ? (1 << (bits - 1)) - 1 : 1; }
  int qmin() const { return bits > 1 ? -(1 << (bits - 1)) : -1; }
};

// Everything a row kernel needs, as raw pointers: the kernels never see at::Tensor, so
// the AVX2 translation unit instantiates nothing but its own (namespaced) code.
struct RowArgs {
  int64_t rows = 0;
  int64_t cols = 0;
  int prune = PRUNE_NONE;
  int nm_n = 0;
  int nm_m = 0;
  int bits = 0;  // 0: no quantize stage
  int qmin = 0;
  int qmax = 0;
  // Length of one quantization group along a row; 0 = one scale for the whole tensor.
  int64_t group = 0;
  int64_t groups_per_row = 0;
  const void* threshold = nullptr;  // compute dtype (float, double for fp64 weights)
  bool threshold_per_row = false;
  const float* scales = nullptr;  // scales[r * groups_per_row + g], or scales[0]
  const uint8_t* mask = nullptr;  // bit-packed keep-mask, (rows, mask_stride) bytes
  int64_t mask_stride = 0;
  double beta_prune = 1.0;  // exact fp32 values, converted to the compute dtype in the kernels
  double beta_quant = 1.0;
};

// Storage dtypes the kernels are instantiated for (index into the kernel table).
enum DtypeIndex : int { DT_FLOAT = 0, DT_DOUBLE = 1, DT_BFLOAT16 = 2, DT_HALF = 3, DT_COUNT = 4 };

// out[r] = W_eff[r] for rows [r0, r1).
using BlendFn = void (*)(const RowArgs&, const void* weight, void* out, int64_t r0, int64_t r1, void* scratch);
// grad[r] *= exact coefficient dW_eff/dW, in place, rows [r0, r1).
using CoefFn = void (*)(const RowArgs&, const void* weight, void* grad, int64_t r0, int64_t r1, void* scratch);
// Per (row, group) statistics of the prune-blended W1 for the quantization scales:
// amax |W1| (bits > 1), or the sum of |W1| and the count of non-zeros (bits == 1).
// With one scale per tensor, one "group" per row (the caller reduces over rows).
using StatsFn = void (*)(const RowArgs&, const void* weight, double* stat, int64_t* count, int64_t r0, int64_t r1,
                         void* scratch);

// out = a * x + b * y over n entries (compute dtype, rounded once to the storage dtype).
using AxpbyFn = void (*)(const void* x, const void* y, void* out, int64_t n, double a, double b);

struct KernelTable {
  const char* isa;
  BlendFn blend[DT_COUNT];
  // fp32 weight -> W_eff in a lower-precision dtype (indexed by the output dtype; bf16 and
  // fp16 only): the mixed-precision (autocast) forward builds the GEMM operand directly.
  BlendFn blend_from_float[DT_COUNT];
  CoefFn coef[DT_COUNT];
  StatsFn stats[DT_COUNT];
  AxpbyFn axpby[DT_COUNT];
};

// Bytes of scratch one call of a row kernel needs for rows of `cols` entries.
inline int64_t row_scratch_bytes(int64_t cols) {
  // Four compute-dtype rows (8 bytes per entry at most), N:M padding, alignment slack.
  return (cols * 4 + 256) * 8 + 256;
}

const KernelTable& kernels_default();
#ifdef VCON_HAVE_AVX2
const KernelTable& kernels_avx2();
#endif

}  // namespace vcon
