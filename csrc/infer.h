// Matmul kernels of the finalized (compressed) layers: y = x W^T with W kept compressed.
//
// The formats are the storages of vcon_kernels/compressed/storage.py; InferArgs is one
// of them flattened to raw pointers (infer.cpp fills it from the tensors). The row
// kernels (infer_kernels.h) are compiled for the baseline ISA, for AVX2 (like kernels.h)
// and for AVX-512, and picked at run time.
#pragma once

#include <cstdint>

namespace vcon {

// Storage formats (vcon_kernels/compressed/matmul.py uses the same numbers).
enum InferFormat : int {
  IF_Q8 = 0,    // int8 codes (N, K)
  IF_QPACK = 1, // 4- or 2-bit codes packed along K (N, ceil(K*bits/8)); code = field + qmin
  IF_Q1 = 2,    // sign bits (N, ceil(K/8)) [+ non-zero bits]; code = +-1 (or 0)
  IF_NM = 3,    // N:M values (N, K*n/m) of the storage dtype + packed in-group positions
  IF_NMQ = 4,   // N:M int8 codes (N, K*n/m) + packed in-group positions
  IF_CSR = 5,   // CSR values of the storage dtype + int16/int32 columns + int64 row pointers
  IF_CSRQ = 6,  // CSR int8 codes + columns + row pointers
};

// Element types of the value arrays of IF_NM / IF_CSR.
enum InferValueType : int { IV_F32 = 0, IV_BF16 = 1, IV_F16 = 2 };

struct InferArgs {
  int fmt = IF_Q8;
  int64_t rows = 0;  // N
  int64_t cols = 0;  // K
  const void* a = nullptr;        // codes / values / sign bits
  int64_t a_stride = 0;           // bytes per row of `a` (dense-row formats)
  const uint8_t* b = nullptr;     // N:M positions / non-zero bits / CSR columns (bytes)
  int64_t b_stride = 0;           // bytes per row of `b` (N:M, non-zero bits)
  const int64_t* crow = nullptr;  // CSR row pointers (rows + 1)
  const float* scales = nullptr;  // quantization scales (formats with codes)
  int64_t group_size = 0;         // 0: one scale for the whole matrix; else columns per scale
  int bits = 8;
  int qmin = 0;
  int nm_n = 0, nm_m = 0, index_bits = 0;
  int value_type = IV_F32;
  int col_bytes = 2;  // CSR column index width
};

// One ISA's kernels. x: (M, K) fp32 row-major; y: (M, N) fp32 row-major.
struct InferTable {
  const char* isa;
  // y[:, n0:n1] for M small: reads each compressed row once. `buf` has M * K floats.
  void (*gemv)(const InferArgs& args, const float* x, int64_t m, float* y, int64_t n0, int64_t n1, float* buf);
  // Rows n0..n1 of the dense W (fp32, row stride K): exactly what materialize() computes in fp32.
  void (*dequant_f32)(const InferArgs& args, int64_t n0, int64_t n1, float* out);
  // The same rows rounded to bf16 (round to nearest even, as torch's .to(bfloat16)); `buf` has K floats.
  void (*dequant_bf16)(const InferArgs& args, int64_t n0, int64_t n1, uint16_t* out, float* buf);
};

const InferTable& infer_default();
#ifdef VCON_HAVE_AVX2
const InferTable& infer_avx2();
#endif
#ifdef VCON_HAVE_AVX512
const InferTable& infer_avx512();
#endif

}  // namespace vcon
