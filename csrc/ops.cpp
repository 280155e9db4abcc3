// The weight-transform ops: compute_state (thresholds and scales), blend_weight, weight_grad.
//
// Each op checks its tensors, flattens them into a RowArgs and runs a row kernel of the
// selected ISA over row ranges in parallel (at::parallel_for: torch's OpenMP pool and
// thread count). See kernels.h for the math and select.cpp for the thresholds.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <atomic>
#include <memory>

#include "select.h"

namespace vcon {

// -- ISA dispatch ---------------------------------------------------------------------------------
namespace {

bool cpu_has_avx2() {
#if defined(VCON_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const KernelTable* auto_kernels() {
#ifdef VCON_HAVE_AVX2
  // at::get_cpu_capability() honours ATEN_CPU_CAPABILITY=default|avx2|avx512, like torch's own kernels.
  const std::string capability = at::get_cpu_capability();
  if (cpu_has_avx2() && (capability == "AVX2" || capability == "AVX512")) {
    return &kernels_avx2();
  }
#endif
  return &kernels_default();
}

std::atomic<const KernelTable*> g_kernels{nullptr};

}  // namespace

const KernelTable& kernels() {
  const KernelTable* k = g_kernels.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = auto_kernels();
    g_kernels.store(k, std::memory_order_release);
  }
  return *k;
}

std::string current_isa() {
  return kernels().isa;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names{"default"};
#ifdef VCON_HAVE_AVX2
  names.emplace_back("avx2");
#endif
  return names;
}

void set_isa(const std::string& name) {
  if (name == "auto") {
    g_kernels.store(auto_kernels());
  } else if (name == "default") {
    g_kernels.store(&kernels_default());
  } else if (name == "avx2") {
#ifdef VCON_HAVE_AVX2
    TORCH_CHECK(cpu_has_avx2(), "vcon_kernels._C.set_isa: this CPU has no AVX2/FMA");
    g_kernels.store(&kernels_avx2());
#else
    TORCH_CHECK(false, "vcon_kernels._C.set_isa: the AVX2 kernels were not compiled into this build");
#endif
  } else {
    TORCH_CHECK(false, "vcon_kernels._C.set_isa: isa must be one of 'auto', 'default', 'avx2', got '", name, "'");
  }
}

// -- argument checks and flattening ------------------------------------------------------------------
namespace {

int dtype_index(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DT_FLOAT;
    case at::kDouble:
      return DT_DOUBLE;
    case at::kBFloat16:
      return DT_BFLOAT16;
    case at::kHalf:
      return DT_HALF;
    default:
      TORCH_CHECK(false, "vcon_kernels._C: weight dtype must be float32, float64, bfloat16 or float16, got ", t);
  }
}

at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu(), "vcon_kernels._C: the cpp backend runs CPU tensors only, got weight on ",
              weight.device(), " (use vk.backends.use('torch') or 'triton' for other devices)");
  TORCH_CHECK(weight.dim() == 2, "vcon_kernels._C: weight must be 2-D (N, K), got shape ", weight.sizes());
  dtype_index(weight.scalar_type());
}

void check_state(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu(), "vcon_kernels._C: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "vcon_kernels._C: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, "vcon_kernels._C: ", name, " must have ", numel, " entries, got shape ", t.sizes());
}

void check_spec(const Spec& spec, int64_t cols) {
  TORCH_CHECK(spec.prune >= PRUNE_NONE && spec.prune <= PRUNE_MASK, "vcon_kernels._C: spec.prune must be 0..3, got ",
              spec.prune);
  TORCH_CHECK(spec.bits == 0 || spec.bits == 1 || spec.bits == 2 || spec.bits == 4 || spec.bits == 8,
              "vcon_kernels._C: spec.bits must be one of 0, 1, 2, 4, 8, got ", spec.bits);
  if (spec.prune == PRUNE_NM) {
    TORCH_CHECK(spec.nm_m >= 2 && spec.nm_m <= 256 && spec.nm_n >= 1 && spec.nm_n < spec.nm_m && cols % spec.nm_m == 0,
                "vcon_kernels._C: N:M needs 1 <= n < m <= 256 with m dividing K=", cols, ", got n=", spec.nm_n,
                " m=", spec.nm_m);
  }
  if (spec.has_quant() && spec.group_size != 0) {
    TORCH_CHECK(spec.group_size > 0 && cols % spec.group_size == 0, "vcon_kernels._C: group_size ", spec.group_size,
                " must divide K=", cols);
  }
}

template <typename F>
void for_row_ranges(int64_t rows, int64_t cols, const F& f) {
  // Tasks of at least ~32K entries: below that the OpenMP fork costs more than the work.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::unique_ptr<char[]> scratch(new char[row_scratch_bytes(cols)]);
    f(r0, r1, scratch.get());
  });
}

}  // namespace

Prepared prepare(const at::Tensor& weight, const at::Tensor& beta, const at::Tensor& threshold,
                 const at::Tensor& scales, const OptTensor& mask, const Spec& spec) {
  check_weight(weight);
  Prepared p;
  p.weight = weight.contiguous();
  p.dtype = dtype_index(weight.scalar_type());
  const int64_t rows = weight.size(0);
  const int64_t cols = weight.size(1);
  check_spec(spec, cols);
  check_state("beta", beta, at::kFloat, spec.lowrank ? 1 : spec.num_stages());
  const at::Tensor b = beta.contiguous();
  const float* bv = b.data_ptr<float>();
  RowArgs& a = p.args;
  a.rows = rows;
  a.cols = cols;
  a.prune = spec.prune;
  a.nm_n = spec.nm_n;
  a.nm_m = spec.nm_m;
  a.bits = spec.bits;
  a.qmin = spec.qmin();
  a.qmax = spec.qmax();
  a.group = spec.group_size;
  a.groups_per_row = spec.group_size == 0 ? 1 : cols / spec.group_size;
  a.beta_prune = spec.has_prune() ? bv[0] : 1.0;
  a.beta_quant = spec.has_quant() ? bv[spec.quant_beta_index()] : 1.0;
  p.identity = a.beta_prune == 1.0 && a.beta_quant == 1.0;
  if (spec.prune == PRUNE_THRESHOLD) {
    check_state("threshold", threshold, compute_dtype(weight.scalar_type()), spec.per_row ? rows : 1);
    p.threshold = threshold.contiguous();
    a.threshold = p.threshold.data_ptr();
    a.threshold_per_row = spec.per_row;
  }
  if (spec.has_quant() && scales.numel() > 0) {  // compute_state passes no scales: it computes them
    check_state("scales", scales, at::kFloat, spec.group_size == 0 ? 1 : rows * a.groups_per_row);
    p.scales = scales.contiguous();
    a.scales = p.scales.data_ptr<float>();
  }
  if (spec.prune == PRUNE_MASK) {
    TORCH_CHECK(mask.has_value() && mask->defined(), "vcon_kernels._C: spec.prune=3 (stored mask) needs a mask");
    check_state("mask", *mask, at::kByte, rows * ((cols + 7) / 8));
    p.mask = mask->contiguous();
    a.mask = p.mask.data_ptr<uint8_t>();
    a.mask_stride = (cols + 7) / 8;
  }
  return p;
}

// -- compute_state -----------------------------------------------------------------------------------
namespace {

template <typename C>
float finish_scale(double stat, int64_t count, int bits, int qmax) {
  if (bits > 1) {  // amax / qmax, divided in the compute dtype as torch does, then fp32
    return static_cast<float>(static_cast<C>(stat) / static_cast<C>(qmax));
  }
  // binary: sum |W1| / max(count(W1 != 0), 1)
  const C total = static_cast<C>(stat);
  return static_cast<float>(total / static_cast<C>(std::max<int64_t>(count, 1)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> compute_state(const at::Tensor& weight, const at::Tensor& beta,
                                                 const OptTensor& mask, const Spec& spec, int64_t kept) {
  check_weight(weight);
  const int64_t rows = weight.size(0);
  const int64_t cols = weight.size(1);
  const auto cdt = compute_dtype(weight.scalar_type());
  const auto opts = weight.options().dtype(cdt);
  at::Tensor threshold = at::empty({spec.prune == PRUNE_THRESHOLD ? (spec.per_row ? rows : 1) : 0}, opts);
  const at::Tensor w = weight.contiguous();
  if (spec.prune == PRUNE_THRESHOLD) {
    magnitude_thresholds(w, kept, spec.per_row, threshold);
  }
  const auto fopts = weight.options().dtype(at::kFloat);
  if (!spec.has_quant()) {
    return {threshold, at::empty({0, 0}, fopts)};
  }
  Prepared p = prepare(w, beta, threshold, at::Tensor(), mask, spec);
  const RowArgs& a = p.args;
  const int64_t per_row = spec.group_size == 0 ? 1 : a.groups_per_row;
  std::vector<double> stat(rows * per_row, 0.0);
  std::vector<int64_t> count(spec.bits == 1 ? rows * per_row : 0, 0);
  const StatsFn fn = kernels().stats[p.dtype];
  const void* wp = p.weight.data_ptr();
  for_row_ranges(rows, cols, [&](int64_t r0, int64_t r1, void* scratch) {
    fn(a, wp, stat.data(), count.empty() ? nullptr : count.data(), r0, r1, scratch);
  });
  at::Tensor scales;
  auto finish = cdt == at::kDouble ? &finish_scale<double> : &finish_scale<float>;
  if (spec.group_size == 0) {  // one scale for the tensor: reduce the per-row statistics
    double s = 0.0;
    int64_t c = 0;
    for (int64_t r = 0; r < rows; ++r) {
      s = spec.bits > 1 ? std::max(s, stat[r]) : s + stat[r];
      c += count.empty() ? 0 : count[r];
    }
    scales = at::empty({1, 1}, fopts);
    scales.data_ptr<float>()[0] = finish(s, c, spec.bits, spec.qmax());
  } else {
    scales = at::empty({rows, per_row}, fopts);
    float* out = scales.data_ptr<float>();
    for (int64_t i = 0; i < rows * per_row; ++i) {
      out[i] = finish(stat[i], count.empty() ? 0 : count[i], spec.bits, spec.qmax());
    }
  }
  return {threshold, scales};
}

// -- blend_weight / weight_grad -------------------------------------------------------------------------
void blend_into(const Prepared& p, at::Tensor& out) {
  TORCH_CHECK(p.args.bits == 0 || p.args.scales != nullptr, "vcon_kernels._C: a quantize stage needs scales");
  const int out_dtype = dtype_index(out.scalar_type());
  BlendFn fn = kernels().blend[p.dtype];
  if (out_dtype != p.dtype) {
    TORCH_CHECK(p.dtype == DT_FLOAT && (out_dtype == DT_BFLOAT16 || out_dtype == DT_HALF),
                "vcon_kernels._C: W_eff can be built in the weight's dtype, or in bf16/fp16 from an fp32 weight; got ",
                p.weight.scalar_type(), " -> ", out.scalar_type());
    fn = kernels().blend_from_float[out_dtype];
  }
  TORCH_CHECK(out.is_contiguous() && out.sizes() == p.weight.sizes(),
              "vcon_kernels._C: W_eff must be contiguous with the weight's shape");
  const void* wp = p.weight.data_ptr();
  void* op = out.data_ptr();
  for_row_ranges(p.args.rows, p.args.cols, [&](int64_t r0, int64_t r1, void* scratch) {
    fn(p.args, wp, op, r0, r1, scratch);
  });
}

at::Tensor blend_weight(const at::Tensor& weight, const at::Tensor& beta, const at::Tensor& threshold,
                        const at::Tensor& scales, const OptTensor& mask, const Spec& spec) {
  TORCH_CHECK(!spec.lowrank, "vcon_kernels._C.blend_weight: a low-rank layer has no single blended weight");
  Prepared p = prepare(weight, beta, threshold, scales, mask, spec);
  at::Tensor out = at::empty_like(p.weight, at::MemoryFormat::Contiguous);
  blend_into(p, out);
  return out;
}

bool has_coefficient(const Prepared& p, const Spec& spec) {
  return spec.exact && !spec.lowrank && !p.identity && (spec.has_prune() || spec.bits > 1);
}

void scale_grad_(const Prepared& p, at::Tensor& grad) {
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == p.weight.sizes() && grad.scalar_type() == p.weight.scalar_type(),
              "vcon_kernels._C: the weight gradient must be contiguous with the weight's shape and dtype");
  TORCH_CHECK(p.args.bits <= 1 || p.args.scales != nullptr, "vcon_kernels._C: a quantize stage needs scales");
  const CoefFn fn = kernels().coef[p.dtype];
  const void* wp = p.weight.data_ptr();
  void* gp = grad.data_ptr();
  for_row_ranges(p.args.rows, p.args.cols, [&](int64_t r0, int64_t r1, void* scratch) {
    fn(p.args, wp, gp, r0, r1, scratch);
  });
}

at::Tensor weight_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& beta,
                       const at::Tensor& threshold, const at::Tensor& scales, const OptTensor& mask, const Spec& spec) {
  if (!spec.exact) {
    return grad;
  }
  if (spec.lowrank) {
    const float b = beta.contiguous().data_ptr<float>()[0];
    return grad * at::scalar_tensor(b, grad.options().dtype(grad.scalar_type()));
  }
  Prepared p = prepare(weight, beta, threshold, scales, mask, spec);
  if (!has_coefficient(p, spec)) {
    return grad;
  }
  TORCH_CHECK(grad.sizes() == weight.sizes() && grad.scalar_type() == weight.scalar_type(),
              "vcon_kernels._C.weight_grad: grad must have the weight's shape and dtype");
  at::Tensor out = grad.contiguous().clone();
  scale_grad_(p, out);
  return out;
}

}  // namespace vcon
