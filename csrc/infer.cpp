// The matmul of a finalized (compressed) linear layer: y = x W^T (+ bias).
//
// * decode (M <= decode_max_m): a GEMV that reads each compressed row once (int8 / packed
//   int4 / binary / 2:4 / CSR fused in registers, the other formats dequantized row by row
//   into an L1 buffer) and multiplies it into every row of x, on the calling thread.
// * prefill, small weights (<= whole_max_bytes dequantized): W dequantized whole into a
//   workspace the calling thread keeps, then torch's addmm (F.linear's own GEMM and bias).
// * prefill, larger weights: W is dequantized block by block (up to 8 MiB, so the block stays
//   in L3) into a per-thread workspace that is reused across calls, and each block goes
//   through one single-threaded BLAS GEMM written straight into its columns of y.
// fp32 / fp16 activations use an fp32 GEMM on the fp32 weight; bf16 activations a bf16 GEMM
// on the weight rounded to bf16 (what materialize() returns for a bf16 layer).
// infer_dequantize is the dequantize alone (CompressedConv2d's weight).
//
// vcon_kernels/compressed/matmul.py calls infer_linear; the arguments are the storage's
// buffers as they are in its state_dict.
#include "infer_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "infer.h"
#include "ops.h"

// Fortran BLAS sgemm of the MKL that libtorch_cpu exports (LP64: 32-bit ints). torch's
// own at::native::cpublas::gemm is not exported to extensions.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace vcon {
namespace {

// y[:, n0:n0+nb] (row stride ldy) = x (M, K) times the block w (nb, K)^T (+ beta y: the bias
// already in y), single-threaded.
void gemm_block(const float* w, int64_t nb, const float* x, int64_t M, int64_t K, float* y, int64_t ldy,
                float beta) {
  // Column-major view: y^T block (nb x M, ld ldy) = w^T' (nb x K) * x^T (K x M).
  const int m = static_cast<int>(nb), n = static_cast<int>(M), k = static_cast<int>(K);
  const int lda = k, ldb = k, ldc = static_cast<int>(ldy);
  const float one = 1.0f;
  sgemm_("T", "N", &m, &n, &k, &one, w, &lda, x, &ldb, &beta, y, &ldc);
}

bool cpu_has_avx512() {
#if defined(VCON_HAVE_AVX512) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// The table set_infer_isa() forced, or null: follow the blend kernels' ISA.
std::atomic<const InferTable*> g_forced{nullptr};

const InferTable& infer_kernels() {
  if (const InferTable* forced = g_forced.load(std::memory_order_acquire)) {
    return *forced;
  }
#ifdef VCON_HAVE_AVX2
  // Follows set_isa() / ATEN_CPU_CAPABILITY through the blend kernels' choice; AVX-512 only
  // where ATen itself runs its AVX-512 kernels (ATEN_CPU_CAPABILITY=avx2 turns it off).
  if (std::strcmp(kernels().isa, "avx2") == 0) {
#ifdef VCON_HAVE_AVX512
    static const bool avx512 = cpu_has_avx512() && at::get_cpu_capability() == "AVX512";
    if (avx512) {
      return infer_avx512();
    }
#endif
    return infer_avx2();
  }
#endif
  return infer_default();
}

// Per-thread buffers, reused across calls (grown, never shrunk). Slot 0: weight blocks and
// rows; slot 1: the whole-weight workspace of the caller, distinct from the row buffer the
// caller also uses as a worker of the parallel dequantize.
template <typename T, int Slot = 0>
T* thread_buffer(int64_t count) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < count) {
    buffer.resize(count);
  }
  return buffer.data();
}

// Weight rows per prefill block: up to 8 MiB of dequantized weight (L3-resident next to its
// GEMM; fewer blocks mean fewer re-packings of x by the BLAS), at least two blocks per thread
// so the threads stay balanced.
int64_t block_rows(int64_t rows, int64_t cols, int64_t element_size) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t nb = std::max<int64_t>(16, (int64_t{8} << 20) / std::max<int64_t>(1, cols * element_size));
  nb = std::min(nb, std::max<int64_t>(16, (rows + 2 * threads - 1) / (2 * threads)));
  return std::min(nb, rows);
}

int64_t packed_len(int64_t cols, int64_t bits) {
  return (cols * bits + 7) / 8;
}

void check_u8(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == at::kByte || t.dtype() == at::kChar, "vcon_kernels._C.infer_linear: ", name,
              " must be uint8 or int8, got ", t.dtype());
}

InferArgs make_args(int64_t K, int64_t fmt, const at::Tensor& a, const OptTensor& b, const OptTensor& crow,
                    const OptTensor& scales, int64_t rows, int64_t bits, int64_t qmin, int64_t group_size,
                    int64_t nm_n, int64_t nm_m, int64_t index_bits) {
  const char* op = "vcon_kernels._C.infer_linear: ";
  InferArgs args;
  args.fmt = static_cast<int>(fmt);
  args.rows = rows;
  args.cols = K;
  args.bits = static_cast<int>(bits);
  args.qmin = static_cast<int>(qmin);
  args.group_size = group_size;
  args.nm_n = static_cast<int>(nm_n);
  args.nm_m = static_cast<int>(nm_m);
  args.index_bits = static_cast<int>(index_bits);
  TORCH_CHECK(rows > 0 && K > 0, op, "empty weight (", rows, ", ", K, ")");
  TORCH_CHECK(a.device().is_cpu() && a.is_contiguous(), op, "a must be a contiguous CPU tensor");
  args.a = a.data_ptr();
  const bool quantized = fmt == IF_Q8 || fmt == IF_QPACK || fmt == IF_Q1 || fmt == IF_NMQ || fmt == IF_CSRQ;
  if (quantized) {
    TORCH_CHECK(scales.has_value() && scales->dtype() == at::kFloat && scales->is_contiguous() &&
                    scales->device().is_cpu(),
                op, "quantized formats need contiguous fp32 CPU scales");
    TORCH_CHECK(group_size >= 0 && (group_size == 0 || K % group_size == 0), op, "group_size ", group_size,
                " does not divide K = ", K);
    const int64_t want = group_size == 0 ? 1 : rows * (K / group_size);
    TORCH_CHECK(scales->numel() == want, op, "scales has ", scales->numel(), " values, expected ", want);
    args.scales = scales->data_ptr<float>();
  }
  auto value_type = [&](const at::Tensor& v) {
    if (v.dtype() == at::kFloat) return static_cast<int>(IV_F32);
    if (v.dtype() == at::kBFloat16) return static_cast<int>(IV_BF16);
    TORCH_CHECK(v.dtype() == at::kHalf, op, "values must be float32, bfloat16 or float16, got ", v.dtype());
    return static_cast<int>(IV_F16);
  };
  switch (fmt) {
    case IF_Q8:
    case IF_QPACK:
    case IF_Q1: {
      check_u8(a, "codes");
      const int64_t width = fmt == IF_Q8 ? K : packed_len(K, fmt == IF_Q1 ? 1 : bits);
      TORCH_CHECK(fmt != IF_QPACK || bits == 4 || bits == 2, op, "packed codes need bits 4 or 2, got ", bits);
      TORCH_CHECK(a.dim() == 2 && a.size(0) == rows && a.size(1) == width, op, "codes must be (", rows, ", ", width,
                  "), got ", a.sizes());
      args.a_stride = width;
      if (fmt == IF_Q1 && b.has_value()) {
        check_u8(*b, "nonzero");
        TORCH_CHECK(b->is_contiguous() && b->dim() == 2 && b->size(0) == rows && b->size(1) == width, op,
                    "nonzero bits must be (", rows, ", ", width, ")");
        args.b = static_cast<const uint8_t*>(b->data_ptr());
        args.b_stride = width;
      }
      break;
    }
    case IF_NM:
    case IF_NMQ: {
      TORCH_CHECK(nm_n > 0 && nm_m >= nm_n && K % nm_m == 0, op, "N:M ", nm_n, ":", nm_m, " does not fit K = ", K);
      TORCH_CHECK(index_bits > 0 && (1 << index_bits) >= nm_m && index_bits <= 8 && 8 % index_bits == 0, op,
                  "index_bits ", index_bits, " cannot hold positions < ", nm_m);
      const int64_t kept = K / nm_m * nm_n;
      TORCH_CHECK(a.dim() == 2 && a.size(0) == rows && a.size(1) == kept, op, "values must be (", rows, ", ", kept,
                  "), got ", a.sizes());
      if (fmt == IF_NM) {
        args.value_type = value_type(a);
      } else {
        TORCH_CHECK(a.dtype() == at::kChar, op, "N:M codes must be int8, got ", a.dtype());
      }
      TORCH_CHECK(b.has_value() && b->is_contiguous() && b->dim() == 2 && b->size(0) == rows &&
                      b->size(1) == packed_len(kept, index_bits),
                  op, "N:M indices must be (", rows, ", ", packed_len(kept, index_bits), ")");
      check_u8(*b, "indices");
      args.b = static_cast<const uint8_t*>(b->data_ptr());
      args.b_stride = b->size(1);
      break;
    }
    case IF_CSR:
    case IF_CSRQ: {
      TORCH_CHECK(b.has_value() && crow.has_value(), op, "CSR needs column indices and row pointers");
      TORCH_CHECK(b->is_contiguous() && (b->dtype() == at::kShort || b->dtype() == at::kInt), op,
                  "CSR columns must be contiguous int16 or int32");
      TORCH_CHECK(crow->is_contiguous() && crow->dtype() == at::kLong && crow->numel() == rows + 1, op,
                  "CSR row pointers must be int64 of length ", rows + 1);
      TORCH_CHECK(a.dim() == 1 && b->numel() == a.numel(), op, "CSR values and columns differ in length");
      if (fmt == IF_CSR) {
        args.value_type = value_type(a);
      } else {
        TORCH_CHECK(a.dtype() == at::kChar, op, "CSR codes must be int8, got ", a.dtype());
      }
      // Row pointers are read as offsets into values: check them (O(rows)); the columns are
      // checked once by the storage when it is built or loaded (compressed/storage.py).
      const int64_t* p = crow->data_ptr<int64_t>();
      TORCH_CHECK(p[0] == 0 && p[rows] == a.numel(), op, "CSR row pointers must run from 0 to nnz");
      for (int64_t r = 0; r < rows; ++r) {
        TORCH_CHECK(p[r] <= p[r + 1], op, "CSR row pointers must not decrease");
      }
      args.b = static_cast<const uint8_t*>(b->data_ptr());
      args.col_bytes = b->dtype() == at::kShort ? 2 : 4;
      args.crow = p;
      break;
    }
    default:
      TORCH_CHECK(false, op, "unknown format ", fmt);
  }
  return args;
}

}  // namespace

at::Tensor infer_linear(const at::Tensor& x, int64_t fmt, const at::Tensor& a, const OptTensor& b,
                        const OptTensor& crow, const OptTensor& scales, int64_t rows, int64_t bits, int64_t qmin,
                        int64_t group_size, int64_t nm_n, int64_t nm_m, int64_t index_bits, int64_t decode_max_m,
                        const OptTensor& bias, int64_t whole_max_bytes) {
  const char* op = "vcon_kernels._C.infer_linear: ";
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.is_contiguous(), op, "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.dtype() == at::kFloat || x.dtype() == at::kBFloat16 || x.dtype() == at::kHalf, op,
              "x must be float32, bfloat16 or float16, got ", x.dtype());
  const InferArgs args =
      make_args(x.size(1), fmt, a, b, crow, scales, rows, bits, qmin, group_size, nm_n, nm_m, index_bits);
  const InferTable& k = infer_kernels();
  const int64_t M = x.size(0), K = x.size(1), N = rows;
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu()), op,
              "bias must be a 1-D CPU tensor of ", N, " values");
  if (M == 0) {
    return at::empty({0, N}, x.options());
  }
  // The GEMMs compute in fp32 for fp32 / fp16 x, in bf16 for bf16 x; the bias joins in that
  // dtype (inside the GEMM where it can: no extra pass over y) and y is rounded once at the end.
  const bool bf16 = x.dtype() == at::kBFloat16;
  const at::ScalarType compute = bf16 ? at::kBFloat16 : at::kFloat;
  const at::Tensor xc = x.dtype() == compute ? x : x.to(compute);
  const OptTensor bc = bias.has_value() ? OptTensor(bias->to(compute).contiguous()) : std::nullopt;
  auto finish = [&](const at::Tensor& y) { return y.dtype() == x.dtype() ? y : y.to(x.dtype()); };
  if (M <= decode_max_m) {
    const at::Tensor xf = xc.dtype() == at::kFloat ? xc : xc.to(at::kFloat);
    at::Tensor y = at::empty({M, N}, xf.options());
    // On the calling thread only: a parallel region here waits for the pool's workers, and
    // after other ops (a dense layer, a softmax) those have gone to sleep; on the shared
    // 2-core machine of bench/RESULTS.md waking them cost 0.3 -> 29 ms per 2048x2048 call,
    // while the GEMV itself is memory-bound and gains little from a second core.
    k.gemv(args, xf.data_ptr<float>(), M, y.data_ptr<float>(), 0, N, thread_buffer<float>(M * K));
    if (bias.has_value()) {
      y.add_(bias->to(at::kFloat));
    }
    return finish(y);
  }
  const int64_t esize = bf16 ? 2 : 4;
  if (N * K * esize <= whole_max_bytes) {
    // Small weights (MiniLM's 384 x 1536): the whole weight dequantized, then the very addmm
    // F.linear(x, materialize(), bias) runs, threaded by torch. Split into blocks, such a
    // GEMM lost 2-10% (each block re-packs all of x for a thin slice of W); the dequantize
    // is O(N K) against the GEMM's O(M N K). Up to 2^20 weights it runs on the calling thread:
    // a second parallel region per call costs more than it saves when the cores are shared
    // (a preempted worker stalls the whole region; bench/INFER_NOTES.md).
    void* ws = bf16 ? static_cast<void*>(thread_buffer<uint16_t, 1>(N * K)) : thread_buffer<float, 1>(N * K);
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / K);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      if (bf16) {
        k.dequant_bf16(args, n0, n1, static_cast<uint16_t*>(ws) + n0 * K, thread_buffer<float>(K));
      } else {
        k.dequant_f32(args, n0, n1, static_cast<float*>(ws) + n0 * K);
      }
    });
    const at::Tensor w = at::from_blob(ws, {N, K}, xc.options());
    at::Tensor y = at::empty({M, N}, xc.options());
    if (bc.has_value()) {
      at::addmm_out(y, *bc, xc, w.t());
    } else {
      at::mm_out(y, xc, w.t());
    }
    return finish(y);
  }
  // Large weights: blocks of up to 8 MiB, one single-threaded GEMM each into its columns of y.
  at::Tensor y = bc.has_value() ? bc->expand({M, N}).contiguous() : at::empty({M, N}, xc.options());
  const int64_t nb = block_rows(N, K, esize);
  if (bf16) {
    // The worker threads run tensor ops (mm, copy_): give them the caller's thread-local
    // state (inference mode, grad mode), which OpenMP threads do not inherit.
    const at::ThreadLocalState state;
    at::parallel_for(0, (N + nb - 1) / nb, 1, [&](int64_t b0, int64_t b1) {
      at::ThreadLocalStateGuard guard(state);
      uint16_t* ws = thread_buffer<uint16_t>(nb * K);
      float* row = thread_buffer<float>(K);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n0 = blk * nb, n1 = std::min(N, n0 + nb);
        k.dequant_bf16(args, n0, n1, ws, row);
        // torch's bf16 matmul (oneDNN, single-threaded inside this parallel region), then
        // into its columns of y: the copy is M x nb, small next to the GEMM's M x nb x K.
        const at::Tensor wb = at::from_blob(ws, {n1 - n0, K}, xc.options());
        at::Tensor cols = y.narrow(1, n0, n1 - n0);
        if (bc.has_value()) {
          cols.add_(at::mm(xc, wb.t()));
        } else {
          cols.copy_(at::mm(xc, wb.t()));
        }
      }
    });
    return y;
  }
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float beta = bc.has_value() ? 1.0f : 0.0f;
  at::parallel_for(0, (N + nb - 1) / nb, 1, [&](int64_t b0, int64_t b1) {
    float* ws = thread_buffer<float>(nb * K);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * nb, n1 = std::min(N, n0 + nb);
      k.dequant_f32(args, n0, n1, ws);
      gemm_block(ws, n1 - n0, xp, M, K, yp + n0, N, beta);
    }
  });
  return finish(y);
}

at::Tensor infer_dequantize(int64_t fmt, const at::Tensor& a, const OptTensor& b, const OptTensor& crow,
                            const OptTensor& scales, int64_t rows, int64_t cols, int64_t bits, int64_t qmin,
                            int64_t group_size, int64_t nm_n, int64_t nm_m, int64_t index_bits, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "vcon_kernels._C.infer_dequantize: dtype must be float32, bfloat16 or float16, got ", dtype);
  const InferArgs args = make_args(cols, fmt, a, b, crow, scales, rows, bits, qmin, group_size, nm_n, nm_m, index_bits);
  const InferTable& k = infer_kernels();
  const bool bf16 = dtype == at::kBFloat16;
  at::Tensor w = at::empty({rows, cols}, a.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  // One pass in rows of ~2^20 weights (on the calling thread for small weights, as in the
  // whole-weight prefill): what materialize() computes with several tensor ops and temporaries.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / cols);
  at::parallel_for(0, rows, grain, [&](int64_t n0, int64_t n1) {
    if (bf16) {
      k.dequant_bf16(args, n0, n1, static_cast<uint16_t*>(w.data_ptr()) + n0 * cols, thread_buffer<float>(cols));
    } else {
      k.dequant_f32(args, n0, n1, w.data_ptr<float>() + n0 * cols);
    }
  });
  return dtype == at::kHalf ? w.to(at::kHalf) : w;
}

std::string infer_isa() {
  return infer_kernels().isa;
}

std::vector<std::string> infer_isas() {
  std::vector<std::string> names{"default"};
#ifdef VCON_HAVE_AVX2
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    names.emplace_back("avx2");
  }
#endif
  if (cpu_has_avx512()) {
    names.emplace_back("avx512");
  }
  return names;
}

void set_infer_isa(const std::string& name) {
  const auto usable = infer_isas();
  TORCH_CHECK(name == "auto" || std::find(usable.begin(), usable.end(), name) != usable.end(),
              "vcon_kernels._C.set_infer_isa: isa must be 'auto' or one this CPU and build run (",
              c10::Join(", ", usable), "), got '", name, "'");
  const InferTable* table = nullptr;
#ifdef VCON_HAVE_AVX2
  if (name == "avx2") table = &infer_avx2();
#endif
#ifdef VCON_HAVE_AVX512
  if (name == "avx512") table = &infer_avx512();
#endif
  if (name == "default") table = &infer_default();
  g_forced.store(table, std::memory_order_release);
}

}  // namespace vcon
