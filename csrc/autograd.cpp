// The eager linear layer of the C++ backend with its autograd node in C++.
//
// Why: in eager mode a Python torch.autograd.Function costs ~15-20 us to apply and another
// ~20-30 us for the engine to call back into Python for its backward; for the small layers of
// decode-like and small-batch fine-tuning that is more than the math. This node does what
// vcon_kernels/eager.py's _Linear does (same kernels: linear_forward / linear_backward, same
// saved tensors: no input kept for a frozen layer) with the engine calling C++ directly.
// vcon_kernels/eager.py uses it when the C++ backend is the one selected and x is on the CPU.
#include "autograd.h"

#include <torch/csrc/autograd/custom_function.h>

#include <c10/core/impl/LocalDispatchKeySet.h>

namespace vcon {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }


// Autocast never reaches into the kernels' own GEMMs (the Python side casts x before the call).
c10::DispatchKeySet autocast_keys() {
  return c10::DispatchKeySet({c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA});
}

struct LinearNode : public torch::autograd::Function<LinearNode> {
  // Optional tensors are std::optional: an undefined at::Tensor would be taken for a variable.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptTensor& bias_opt, const at::Tensor& beta, const at::Tensor& threshold,
                            const at::Tensor& scales, const OptTensor& mask_opt, const OptTensor& u_opt,
                            const OptTensor& v_opt, const Spec& spec) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
    const auto value = [](const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); };
    const at::Tensor bias = value(bias_opt), mask = value(mask_opt), u = value(u_opt), v = value(v_opt);
    const auto wants = [](const at::Tensor& t) { return t.defined() && t.requires_grad(); };
    // What the Python Function's ctx.needs_input_grad says: the inputs' requires_grad at forward.
    const bool need_x = wants(x), need_w = wants(weight), need_b = wants(bias), need_lr = wants(u) || wants(v);
    ctx->saved_data["needs"] = c10::IValue(std::vector<bool>{need_x, need_w, need_b, need_lr});
    const int64_t k = x.size(-1);
    const at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, k});
    // Low rank with U training: keep t' = (1-beta) x V^T (M x r) for dU where the forward computes
    // it (activation space, beta = 0: then as two nn.Linear would), instead of recomputing it.
    at::Tensor t;
    const KeepT keep = spec.lowrank && wants(u) ? KeepT::kIfComputed : KeepT::kNone;
    const at::Tensor y =
        linear_forward(x2, weight, opt(bias), beta, threshold, scales, opt(mask), opt(u), opt(v), spec, keep, t);
    // x only when a weight-side gradient needs it (a frozen layer keeps no activation alive).
    ctx->save_for_backward(
        {need_w || need_lr ? x : at::Tensor(), weight, bias, beta, threshold, scales, mask, u, v, t});
    ctx->saved_data["x_sizes"] = x.sizes();
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["spec"] = c10::IValue(std::vector<int64_t>{spec.prune, spec.per_row, spec.nm_n, spec.nm_m,
                                                                 spec.bits, spec.group_size, spec.exact, spec.lowrank});
    ctx->saved_data["sparsity"] = spec.sparsity;
    if (x.dim() == 2) return y.contiguous();
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
    shape.push_back(weight.size(0));
    return at::_unsafe_view(y.contiguous(), shape);  // not a view: in-place ops on the output stay legal
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &beta = saved[3];
    const at::Tensor &threshold = saved[4], &scales = saved[5], &mask = saved[6], &u = saved[7], &v = saved[8];
    const auto fields = ctx->saved_data["spec"].toIntVector();
    Spec spec;
    spec.prune = static_cast<int>(fields[0]);
    spec.per_row = fields[1] != 0;
    spec.nm_n = static_cast<int>(fields[2]);
    spec.nm_m = static_cast<int>(fields[3]);
    spec.bits = static_cast<int>(fields[4]);
    spec.group_size = fields[5];
    spec.exact = fields[6] != 0;
    spec.lowrank = fields[7] != 0;
    spec.sparsity = ctx->saved_data["sparsity"].toDouble();
    const auto x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    const int64_t k = x_sizes.back(), n = weight.size(0);
    const auto needs = ctx->saved_data["needs"].toBoolList();
    const bool need_x = needs[0], need_w = needs[1], need_b = needs[2], need_lr = needs[3];
    const at::Tensor g2 = grads[0].reshape({-1, n});
    // The kernels read only the shape and dtype of x when no weight-side gradient is asked for.
    const at::Tensor x2 = x.defined()
                              ? x.reshape({-1, k})
                              : at::zeros({}, g2.options().dtype(ctx->saved_data["x_dtype"].toScalarType()))
                                    .expand({g2.size(0), k});
    const std::vector<bool> wanted{need_x, need_w, need_b, need_lr};
    auto out = linear_backward(g2, x2, weight, opt(bias), beta, threshold, scales, opt(mask), opt(u), opt(v), spec,
                               wanted, opt(saved[9]));
    at::Tensor dx = out[0].defined() ? out[0].reshape(x_sizes) : at::Tensor();
    return {dx,          out[1],       need_b ? out[2] : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), need_lr ? out[3] : at::Tensor(), need_lr ? out[4] : at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                           const at::Tensor& beta, const at::Tensor& threshold, const at::Tensor& scales,
                           const OptTensor& mask, const OptTensor& u, const OptTensor& v, const Spec& spec) {
  return LinearNode::apply(x, weight, bias, beta, threshold, scales, mask, u, v, spec);
}

}  // namespace vcon
