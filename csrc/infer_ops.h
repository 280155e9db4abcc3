// Tensor-level op of the finalized-layer matmul (infer.cpp); bound in module.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace vcon {

// y = x W^T (+ bias) for W in one of the InferFormat storages (infer.h); y has x's dtype.
// M <= decode_max_m runs the GEMV; larger M dequantizes the whole weight and runs torch's
// addmm when it takes at most whole_max_bytes (in the compute dtype), else the blocked
// dequantize + GEMM.
at::Tensor infer_linear(const at::Tensor& x, int64_t fmt, const at::Tensor& a, const std::optional<at::Tensor>& b,
                        const std::optional<at::Tensor>& crow, const std::optional<at::Tensor>& scales, int64_t rows,
                        int64_t bits, int64_t qmin, int64_t group_size, int64_t nm_n, int64_t nm_m,
                        int64_t index_bits, int64_t decode_max_m, const std::optional<at::Tensor>& bias,
                        int64_t whole_max_bytes);

// The dense (rows, cols) weight of a storage in `dtype` (float32, bfloat16, float16): exactly
// what the storage's materialize() returns, in one pass.
at::Tensor infer_dequantize(int64_t fmt, const at::Tensor& a, const std::optional<at::Tensor>& b,
                            const std::optional<at::Tensor>& crow, const std::optional<at::Tensor>& scales,
                            int64_t rows, int64_t cols, int64_t bits, int64_t qmin, int64_t group_size, int64_t nm_n,
                            int64_t nm_m, int64_t index_bits, at::ScalarType dtype);

// The ISA of the infer kernels in use ("default", "avx2" or "avx512").
std::string infer_isa();

// The infer ISAs compiled into this build that this CPU runs.
std::vector<std::string> infer_isas();

// Force one of infer_isas() (tests, benchmarks), or "auto": follow set_isa / the CPU.
void set_infer_isa(const std::string& name);

}  // namespace vcon
