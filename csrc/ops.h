// Tensor-level ops of the C++ CPU backend (ops.cpp, linear.cpp). Arguments follow the
// torch.ops.vcon ops of vcon_kernels/library.py, already validated there; these functions
// re-check what would otherwise be undefined behaviour (dtypes, shapes, devices).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "vcon.h"

namespace vcon {

using OptTensor = std::optional<at::Tensor>;

// -- ISA dispatch (ops.cpp) ---------------------------------------------------------------------
const KernelTable& kernels();
std::string current_isa();
// "auto" (AVX2 when the CPU and ATEN_CPU_CAPABILITY allow it), "default" or "avx2".
void set_isa(const std::string& name);
std::vector<std::string> compiled_isas();

// -- the weight transform (ops.cpp) ----------------------------------------------------------------
// The weight, state and kernel arguments of one call, kept together so the raw pointers
// in `args` stay valid.
struct Prepared {
  at::Tensor weight;  // contiguous 2-D
  at::Tensor threshold;
  at::Tensor scales;
  at::Tensor mask;
  RowArgs args;
  int dtype = DT_FLOAT;
  bool identity = false;  // every stage beta is 1: W_eff == W exactly
};

Prepared prepare(const at::Tensor& weight, const at::Tensor& beta, const at::Tensor& threshold,
                 const at::Tensor& scales, const OptTensor& mask, const Spec& spec);

// (threshold, scales) of the current weight; `kept` is the kept count of a threshold prune.
std::tuple<at::Tensor, at::Tensor> compute_state(const at::Tensor& weight, const at::Tensor& beta,
                                                 const OptTensor& mask, const Spec& spec, int64_t kept);

// W_eff into `out` (contiguous, the weight's shape and dtype).
void blend_into(const Prepared& p, at::Tensor& out);

at::Tensor blend_weight(const at::Tensor& weight, const at::Tensor& beta, const at::Tensor& threshold,
                        const at::Tensor& scales, const OptTensor& mask, const Spec& spec);

// Whether the exact-mode coefficient differs from 1 (not for STE, binary alone, or beta = 1).
bool has_coefficient(const Prepared& p, const Spec& spec);

// grad *= dW_eff/dW in place (grad: contiguous, the weight's shape and dtype).
void scale_grad_(const Prepared& p, at::Tensor& grad);

// dW from dL/dW_eff: `grad` itself for STE, else a new tensor.
at::Tensor weight_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& beta,
                       const at::Tensor& threshold, const at::Tensor& scales, const OptTensor& mask, const Spec& spec);

// -- the blended linear layer (linear.cpp) --------------------------------------------------------
// Which low-rank forwards hand back t' = (1-b) x V^T (M x r) for the backward's dU = dY^T t':
// none; those that compute it anyway (activation space, beta = 0: the C++ autograd node, which
// then skips that thin GEMM in backward); or every one (the op, whose outputs have fixed shapes:
// zeros at beta = 1, an extra thin GEMM in the weight-space regime).
enum class KeepT : int64_t { kNone = 0, kIfComputed = 1, kAlways = 2 };

// y; t' into `t_out` for a low-rank layer as `keep_t` asks (else left undefined).
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                          const at::Tensor& beta, const at::Tensor& threshold, const at::Tensor& scales,
                          const OptTensor& mask, const OptTensor& u, const OptTensor& v, const Spec& spec,
                          KeepT keep_t, at::Tensor& t_out);

// (dx, dW, db, dU, dV); undefined (None) where `needs` = (x, weight, bias, lowrank) says not needed.
// `t`: the forward's t' (linear_forward's t_out) or none (recomputed where needed).
std::vector<at::Tensor> linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                        const OptTensor& bias, const at::Tensor& beta, const at::Tensor& threshold,
                                        const at::Tensor& scales, const OptTensor& mask, const OptTensor& u,
                                        const OptTensor& v, const Spec& spec, const std::vector<bool>& needs,
                                        const OptTensor& t);

// The per-thread workspace that holds W_eff between its build and its GEMM.
int64_t workspace_bytes();
void release_workspace();

}  // namespace vcon
