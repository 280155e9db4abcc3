// The blended linear layer on CPU: build W_eff once into a reused workspace, then one GEMM.
//
// Forward:   W_eff -> workspace (one pass over W), y = addmm(b, x, W_eff^T)       (= F.linear)
// Backward:  W_eff -> workspace again, dx = dY W_eff; dW = dY^T X (scaled in place for
//            exact gradients); db = sum dY. Nothing weight-sized is kept between the two.
//
// The workspace is one buffer per thread and dtype, grown to the largest weight seen and
// reused by every layer, so a model pays for one weight-sized buffer, not one per layer,
// and no step pays for fresh pages (allocating and first-touching 4 MB costs about as much
// as the transform itself). It never escapes: only these functions read it, and only
// between building W_eff and the GEMM that consumes it.
//
// Low rank (no weight transform): with G = dY^T X and t = x V^T,
//   y  = b x W^T + (1-b) t U^T + bias,      dx = b dY W + (1-b) (dY U) V,
//   dW = G (STE, 0 at b = 0) or b G (exact),  dU = (1-b) dY^T t = (1-b) G V^T,  dV = (1-b) (dY U)^T x = (1-b) U^T G.
// Two ways to run it, picked per call by FLOP count:
//   weight space:     W_eff = b W + (1-b) U V into the workspace (N K r, in cache-sized row
//                     blocks: one read of W, one write) and one dense GEMM; backward
//                     reuses G for dU and dV (2 N K r);
//   activation space: addmm accumulation of the thin products (M r (N + K) forward).
// The weight-space form wins when M is larger than about N K / (N + K) (512 for a square
// 1024 layer), i.e. for training batches; small M (inference, decoding) uses the other.
// beta = 1 is exactly nn.Linear and beta = 0 exactly the finalized V-then-U pair.
//
// The forward can hand back t' = (1-b) x V^T (M x r, x's dtype), which the backward then takes
// for dU = dY^T t' instead of recomputing the thin GEMM x V^T (activation space and beta = 0; the
// weight-space backward gets dU from G). Every backend keeps the same t' (the plain-torch one
// bit for bit), so a backward on another backend reads it correctly. KeepT says when to make it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <array>

#include "ops.h"

namespace vcon {

// -- workspace -------------------------------------------------------------------------------------
namespace {

thread_local std::array<at::Tensor, DT_COUNT> t_workspace;

at::Tensor workspace(const at::Tensor& like, int64_t rows, int64_t cols) {
  auto& buf = t_workspace[like.scalar_type() == at::kFloat      ? DT_FLOAT
                          : like.scalar_type() == at::kDouble   ? DT_DOUBLE
                          : like.scalar_type() == at::kBFloat16 ? DT_BFLOAT16
                                                                : DT_HALF];
  const int64_t n = rows * cols;
  if (!buf.defined() || buf.numel() < n) {
    buf = at::Tensor();  // free the old buffer before allocating the larger one
    buf = at::empty({n}, like.options().memory_format(at::MemoryFormat::Contiguous));
  }
  return buf.narrow(0, 0, n).view({rows, cols});
}

}  // namespace

int64_t workspace_bytes() {
  int64_t total = 0;
  for (const auto& t : t_workspace) {
    if (t.defined()) {
      total += t.numel() * t.element_size();
    }
  }
  return total;
}

void release_workspace() {
  for (auto& t : t_workspace) {
    t = at::Tensor();
  }
}

namespace {

// Mixed precision (autocast): bf16/fp16 activations with fp32 parameters. W_eff is then built
// from the fp32 weight straight into a workspace of the activation dtype.
bool is_mixed(const at::Tensor& x, const at::Tensor& weight) {
  return x.scalar_type() != weight.scalar_type() && weight.scalar_type() == at::kFloat &&
         (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf);
}

void check_linear(const at::Tensor& x, const at::Tensor& weight, const char* what) {
  TORCH_CHECK(x.dim() == 2, "vcon_kernels._C.", what, ": input must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() || is_mixed(x, weight), "vcon_kernels._C.", what,
              ": input dtype ", x.scalar_type(), " does not match the weight dtype ", weight.scalar_type(),
              " (mixed precision takes bf16/fp16 inputs with fp32 weights only)");
  TORCH_CHECK(x.device() == weight.device(), "vcon_kernels._C.", what, ": input and weight are on different devices");
  TORCH_CHECK(weight.dim() == 2 && x.size(1) == weight.size(1), "vcon_kernels._C.", what, ": input has ", x.size(1),
              " features, the weight expects ", weight.size(1));
}

at::Tensor opt(const OptTensor& t) {
  return t.has_value() ? *t : at::Tensor();
}

// W_eff for a GEMM with `act` (activations of the GEMM's dtype): the weight itself when every
// beta is 1 and the dtypes agree, else built into the workspace of that dtype.
at::Tensor effective_weight(const Prepared& p, const at::Tensor& act) {
  if (p.identity && act.scalar_type() == p.weight.scalar_type()) {
    return p.weight;
  }
  at::Tensor ws = workspace(act, p.args.rows, p.args.cols);
  blend_into(p, ws);
  return ws;
}

at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return (!t.defined() || t.scalar_type() == dtype) ? t : t.to(dtype);
}

// beta and 1 - beta as the plain-torch backend uses them: fp32 values (b = beta[0], 1 - b in
// fp32), also for bf16 / fp16 tensors, whose GEMMs and scalar products compute in fp32 anyway.
// (Rounding beta to bf16 first, as this code once did, shifted the low-rank blend by up to 0.4%,
// which cancellation in dx = b dY W + (1-b) dY U V turned into failures of the bf16 property tests.)
std::pair<double, double> lowrank_betas(const at::Tensor& beta, at::ScalarType dtype) {
  TORCH_CHECK(beta.scalar_type() == at::kFloat && beta.numel() == 1,
              "vcon_kernels._C: low-rank beta must be one fp32 value, got shape ", beta.sizes());
  const float b = beta.contiguous().data_ptr<float>()[0];
  if (dtype == at::kDouble) {
    return {static_cast<double>(b), 1.0 - static_cast<double>(b)};
  }
  return {b, 1.0f - b};
}

int dtype_slot(at::ScalarType t) {
  return t == at::kFloat ? DT_FLOAT : t == at::kDouble ? DT_DOUBLE : t == at::kBFloat16 ? DT_BFLOAT16 : DT_HALF;
}

// out = b W + (1 - b) U V, in blocks of rows whose U V part stays in cache: one read of W
// and one write of out. (addmm_out(out, W, U, V, b, 1 - b) copies W into out first and
// then reads and writes out again in the GEMM: twice the memory traffic.)
void lowrank_weight(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, double b, double omb,
                    at::Tensor& out) {
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t block = std::max<int64_t>(8, (int64_t(1) << 16) / std::max<int64_t>(k, 1));  // ~64K entries
  const at::Tensor w = weight.contiguous();
  const AxpbyFn axpby = kernels().axpby[dtype_slot(w.scalar_type())];
  const int64_t esize = w.element_size();
  const char* wp = static_cast<const char*>(w.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  // Detached: the worker threads do not inherit this thread's grad mode, and an out= GEMM
  // refuses inputs that require grad while grad mode is on.
  const at::Tensor ud = u.detach(), vd = v.detach();
  at::parallel_for(0, (n + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor tmp = at::empty({block, k}, out.options());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * block, h = std::min(block, n - r0);
      at::Tensor part = tmp.narrow(0, 0, h);
      at::mm_out(part, ud.narrow(0, r0, h), vd);
      axpby(wp + r0 * k * esize, part.data_ptr(), op + r0 * k * esize, h * k, b, omb);
    }
  });
}

void check_factors(const OptTensor& u, const OptTensor& v, const at::Tensor& weight) {
  TORCH_CHECK(u.has_value() && v.has_value() && u->defined() && v->defined(),
              "vcon_kernels._C: a low-rank layer needs lowrank_u and lowrank_v");
  TORCH_CHECK(u->dim() == 2 && v->dim() == 2 && u->size(0) == weight.size(0) && v->size(1) == weight.size(1) &&
                  u->size(1) == v->size(0),
              "vcon_kernels._C: low-rank factors must be U (N, r) and V (r, K), got ", u->sizes(), " and ", v->sizes());
  TORCH_CHECK(u->scalar_type() == weight.scalar_type() && v->scalar_type() == weight.scalar_type(),
              "vcon_kernels._C: low-rank factors must have the weight's dtype");
}

// t *= 1 - beta as the plain-torch backend scales it (t.mul_(1 - beta[0])): by an fp32 0-dim
// tensor, so that both backends keep the same t' bit for bit. (An in-place mul_ by a C++ double
// takes another kernel for bf16 t, whose results differ from it in the last bit.)
at::Tensor& scale_t_(at::Tensor& t, const at::Tensor& beta) {
  return t.mul_(at::rsub(beta.reshape({}), 1));
}

// t' = (1-b) x V^T as the backward recomputes it when the forward kept none.
at::Tensor lowrank_t(const at::Tensor& x, const at::Tensor& v, const at::Tensor& beta, double omb) {
  at::Tensor t = at::linear(x, v);
  return omb == 1.0 ? t : scale_t_(t, beta);
}

// y, and t' into `t_out` as `keep` asks (see KeepT).
at::Tensor lowrank_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& beta, const at::Tensor& u, const at::Tensor& v, KeepT keep,
                           at::Tensor& t_out) {
  const auto [b, omb] = lowrank_betas(beta, x.scalar_type());
  const int64_t m = x.size(0), n = weight.size(0), k = weight.size(1);
  if (b == 1.0) {
    if (keep == KeepT::kAlways) t_out = at::zeros({m, v.size(0)}, x.options());  // (1 - b) x V^T = 0
    return at::linear(x, weight, bias);
  }
  if (b == 0.0) {
    at::Tensor t = at::linear(x, v);  // = t' (1 - b = 1)
    if (keep != KeepT::kNone) t_out = t;
    return at::linear(t, u, bias);
  }
  if (n * k <= m * (n + k)) {  // weight space: N K r to build W_eff vs M r (N + K) for the thin products
    at::Tensor w_eff = workspace(weight, n, k);
    lowrank_weight(weight, u, v, b, omb, w_eff);
    // No t here: only a caller that must return one pays its thin GEMM (the op path; the backward
    // of this regime takes dU from G unless W is frozen).
    if (keep == KeepT::kAlways) t_out = lowrank_t(x, v, beta, omb);
    return at::linear(x, w_eff, bias);
  }
  // Activation space: both products accumulate into y through addmm's alpha, no extra pass.
  at::Tensor y = bias.defined() ? at::addmm(bias, x, weight.t(), 1.0, b)
                                : at::empty({m, n}, x.options()).addmm_(x, weight.t(), 0.0, b);
  at::Tensor t = at::linear(x, v);
  y.addmm_(t, u.t(), 1.0, omb);
  if (keep != KeepT::kNone) t_out = scale_t_(t, beta);  // y is done with the unscaled t
  return y;
}

std::vector<at::Tensor> lowrank_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& beta, const at::Tensor& u, const at::Tensor& v,
                                         const at::Tensor& t, const Spec& spec, bool need_x, bool need_w,
                                         bool need_lr) {
  const auto [b, omb] = lowrank_betas(beta, x.scalar_type());
  at::Tensor dx, dw, du, dv;
  const int64_t m = x.size(0), n = weight.size(0), k = weight.size(1), r = v.size(0);
  if (b == 1.0) {
    if (need_x) dx = dy.mm(weight);
    if (need_w) dw = dy.t().mm(x);
    if (need_lr) {
      du = at::zeros_like(u);
      dv = at::zeros_like(v);
    }
    return {dx, dw, at::Tensor(), du, dv};
  }
  const auto scale_dw = [&](at::Tensor g) { return spec.exact ? g.mul_(b) : g; };
  if (b == 0.0) {  // the finalized pair, as nn.Sequential(Linear(K, r), Linear(r, N)) computes it
    const at::Tensor gu = (need_x || need_lr) ? dy.mm(u) : at::Tensor();
    if (need_x) dx = gu.mm(v);
    if (need_w) dw = at::zeros_like(weight);  // the dense path is stopped: W no longer affects y
    if (need_lr) {
      du = dy.t().mm(t.defined() ? t : lowrank_t(x, v, beta, omb));
      dv = gu.t().mm(x);
    }
    return {dx, dw, at::Tensor(), du, dv};
  }
  // FLOPs beyond the shared dense GEMMs (dx = dY W_eff and G = dY^T X). The rule ignores whether t'
  // came from the forward, so a call that kept it and one that did not take the same path (same
  // bits); whenever the forward ran in activation space, need_lr picks activation space here too.
  const int64_t weight_space = (need_x ? n * k * r : 0) + (need_lr ? 2 * n * k * r : 0) +
                               (need_lr && !need_w ? m * n * k : 0);
  const int64_t act_space = ((need_x || need_lr) ? m * n * r : 0) + (need_x ? m * r * k : 0) +
                            (need_lr ? m * r * (2 * k + n) : 0);
  if (weight_space <= act_space) {
    const at::Tensor g = (need_w || need_lr) ? dy.t().mm(x) : at::Tensor();
    if (need_x) {
      at::Tensor w_eff = workspace(weight, n, k);
      lowrank_weight(weight, u, v, b, omb, w_eff);
      dx = dy.mm(w_eff);
    }
    if (need_lr) {
      du = at::empty({n, r}, x.options()).addmm_(g, v.t(), 0.0, omb);
      dv = at::empty({r, k}, x.options()).addmm_(u.t(), g, 0.0, omb);
    }
    if (need_w) dw = scale_dw(g);
    return {dx, dw, at::Tensor(), du, dv};
  }
  const at::Tensor gu = (need_x || need_lr) ? dy.mm(u) : at::Tensor();
  if (need_x) {
    dx = at::empty({m, k}, x.options()).addmm_(dy, weight, 0.0, b).addmm_(gu, v, 1.0, omb);
  }
  if (need_w) dw = scale_dw(dy.t().mm(x));
  if (need_lr) {
    du = dy.t().mm(t.defined() ? t : lowrank_t(x, v, beta, omb));
    dv = at::empty({r, k}, x.options()).addmm_(gu.t(), x, 0.0, omb);
  }
  return {dx, dw, at::Tensor(), du, dv};
}

}  // namespace

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                          const at::Tensor& beta, const at::Tensor& threshold, const at::Tensor& scales,
                          const OptTensor& mask, const OptTensor& u, const OptTensor& v, const Spec& spec,
                          KeepT keep_t, at::Tensor& t_out) {
  // These are the kernels of an op: autograd is handled around them, never inside (and the
  // out= GEMMs below would refuse inputs that require grad while grad mode is on).
  c10::AutoGradMode no_grad(false);
  check_linear(x, weight, "linear_forward");
  const auto dt = x.scalar_type();
  if (spec.lowrank) {
    check_factors(u, v, weight);
    // Mixed precision: the (small) factors and the weight in the activation dtype, for this call only.
    return lowrank_forward(x, in_dtype(weight, dt), in_dtype(opt(bias), dt), beta, in_dtype(*u, dt), in_dtype(*v, dt),
                           keep_t, t_out);
  }
  const Prepared p = prepare(weight, beta, threshold, scales, mask, spec);
  return at::linear(x, effective_weight(p, x), in_dtype(opt(bias), dt));
}

std::vector<at::Tensor> linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                        const OptTensor& bias, const at::Tensor& beta, const at::Tensor& threshold,
                                        const at::Tensor& scales, const OptTensor& mask, const OptTensor& u,
                                        const OptTensor& v, const Spec& spec, const std::vector<bool>& needs,
                                        const OptTensor& t) {
  c10::AutoGradMode no_grad(false);
  check_linear(x, weight, "linear_backward");
  TORCH_CHECK(needs.size() == 4, "vcon_kernels._C.linear_backward: needs must be (x, weight, bias, lowrank)");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == weight.size(0),
              "vcon_kernels._C.linear_backward: grad_out must be (M, N), got ", grad_out.sizes());
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2], need_lr = needs[3];
  at::Tensor db;
  std::vector<at::Tensor> grads;
  const auto pdt = weight.scalar_type();
  if (spec.lowrank) {
    check_factors(u, v, weight);
    const auto dt = x.scalar_type();
    const at::Tensor t_kept = opt(t);
    TORCH_CHECK(!t_kept.defined() || (t_kept.dim() == 2 && t_kept.size(0) == x.size(0) &&
                                      t_kept.size(1) == u->size(1) && t_kept.scalar_type() == dt),
                "vcon_kernels._C.linear_backward: t must be the forward's (M, r) activation in the input dtype, got ",
                t_kept.sizes());
    grads = lowrank_backward(grad_out, x, in_dtype(weight, dt), beta, in_dtype(*u, dt), in_dtype(*v, dt), t_kept,
                             spec, need_x, need_w, need_lr);
    if (need_b) grads[2] = grad_out.sum(0);
    for (size_t i = 1; i < grads.size(); ++i) {  // parameter gradients in the parameters' dtype
      grads[i] = in_dtype(grads[i], pdt);
    }
    return grads;
  }
  const Prepared p = prepare(weight, beta, threshold, scales, mask, spec);
  at::Tensor dx, dw;
  if (need_x) {
    dx = grad_out.mm(effective_weight(p, grad_out));
  }
  if (need_w) {
    dw = in_dtype(grad_out.t().mm(x), pdt);
    if (has_coefficient(p, spec)) {
      scale_grad_(p, dw);
    }
  }
  if (need_b && bias.has_value() && bias->defined()) {
    db = grad_out.sum(0).to(bias->scalar_type());
  }
  return {dx, dw, db, at::Tensor(), at::Tensor()};
}

}  // namespace vcon
