// Python bindings of the vcon_kernels C++ CPU extension (vcon_kernels._C).
//
// vcon_kernels/backends/cpp_backend.py calls these from the torch.ops.vcon ops; they are
// not a public API. Every call releases the GIL while it computes.
#include <torch/extension.h>

#include "autograd.h"
#include "infer_ops.h"
#include "ops.h"
#include "select.h"

namespace {

// Bumped whenever a binding changes: cpp_backend.py refuses (and falls back from) a stale build.
constexpr int kAbiVersion = 4;

vcon::Spec make_spec(int prune, double sparsity, bool per_row, int nm_n, int nm_m, int bits, int64_t group_size,
                     bool exact, bool lowrank) {
  vcon::Spec s;
  s.prune = prune;
  s.sparsity = sparsity;
  s.per_row = per_row;
  s.nm_n = nm_n;
  s.nm_m = nm_m;
  s.bits = bits;
  s.group_size = group_size;
  s.exact = exact;
  s.lowrank = lowrank;
  return s;
}

// (y, t' or None): linear_forward with its t' output as a second return value.
std::tuple<at::Tensor, std::optional<at::Tensor>> linear_forward_py(
    const at::Tensor& x, const at::Tensor& weight, const vcon::OptTensor& bias, const at::Tensor& beta,
    const at::Tensor& threshold, const at::Tensor& scales, const vcon::OptTensor& mask, const vcon::OptTensor& u,
    const vcon::OptTensor& v, const vcon::Spec& spec, int64_t keep_t) {
  TORCH_CHECK(keep_t >= 0 && keep_t <= 2, "vcon_kernels._C.linear_forward: keep_t must be 0, 1 or 2");
  at::Tensor t;
  at::Tensor y = vcon::linear_forward(x, weight, bias, beta, threshold, scales, mask, u, v, spec,
                                      static_cast<vcon::KeepT>(keep_t), t);
  return {y, t.defined() ? std::optional<at::Tensor>(t) : std::nullopt};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using release = py::call_guard<py::gil_scoped_release>;
  m.doc() = "vcon_kernels C++ CPU ops (fused blended-weight transforms and linear layers)";
  m.attr("ABI_VERSION") = kAbiVersion;

  py::class_<vcon::Spec>(m, "Spec")
      .def(py::init(&make_spec), py::arg("prune"), py::arg("sparsity"), py::arg("per_row"), py::arg("nm_n"),
           py::arg("nm_m"), py::arg("bits"), py::arg("group_size"), py::arg("exact"), py::arg("lowrank"))
      .def_readonly("prune", &vcon::Spec::prune)
      .def_readonly("bits", &vcon::Spec::bits)
      .def_readonly("group_size", &vcon::Spec::group_size)
      .def_readonly("exact", &vcon::Spec::exact)
      .def_readonly("lowrank", &vcon::Spec::lowrank);

  m.def("compute_state", &vcon::compute_state, release(), "(threshold, scales) of the current weight",
        py::arg("weight"), py::arg("beta"), py::arg("mask"), py::arg("spec"), py::arg("kept"));
  m.def("blend_weight", &vcon::blend_weight, release(), "W_eff as a new tensor", py::arg("weight"), py::arg("beta"),
        py::arg("threshold"), py::arg("scales"), py::arg("mask"), py::arg("spec"));
  m.def("weight_grad", &vcon::weight_grad, release(), "dW from dL/dW_eff (grad itself for STE)", py::arg("grad"),
        py::arg("weight"), py::arg("beta"), py::arg("threshold"), py::arg("scales"), py::arg("mask"),
        py::arg("spec"));
  m.def("linear_forward", &linear_forward_py, release(),
        "(y, t') of the blended linear layer; t' = (1-beta) x V^T of a low-rank layer as keep_t asks "
        "(0 none, 1 if computed anyway, 2 always), else None", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("beta"), py::arg("threshold"), py::arg("scales"),
        py::arg("mask"), py::arg("u"), py::arg("v"), py::arg("spec"), py::arg("keep_t") = 0);
  m.def("linear_autograd", &vcon::linear_autograd, release(),
        "the blended linear layer with its autograd node in C++ (eager fast path)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("beta"), py::arg("threshold"), py::arg("scales"), py::arg("mask"), py::arg("u"),
        py::arg("v"), py::arg("spec"));
  m.def("linear_backward", &vcon::linear_backward, release(), "(dx, dW, db, dU, dV), None where not needed",
        py::arg("grad_out"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("beta"), py::arg("threshold"),
        py::arg("scales"), py::arg("mask"), py::arg("u"), py::arg("v"), py::arg("spec"), py::arg("needs"),
        py::arg("t") = py::none());

  m.def("infer_linear", &vcon::infer_linear, release(), "y = x W^T of a finalized (compressed) weight",
        py::arg("x"), py::arg("fmt"), py::arg("a"), py::arg("b"), py::arg("crow"), py::arg("scales"),
        py::arg("rows"), py::arg("bits"), py::arg("qmin"), py::arg("group_size"), py::arg("nm_n"), py::arg("nm_m"),
        py::arg("index_bits"), py::arg("decode_max_m"), py::arg("bias") = py::none(),
        py::arg("whole_max_bytes") = 0);
  m.def("infer_dequantize", &vcon::infer_dequantize, release(),
        "the dense weight of a finalized storage (what its materialize() returns), in one pass", py::arg("fmt"),
        py::arg("a"), py::arg("b"), py::arg("crow"), py::arg("scales"), py::arg("rows"), py::arg("cols"),
        py::arg("bits"), py::arg("qmin"), py::arg("group_size"), py::arg("nm_n"), py::arg("nm_m"),
        py::arg("index_bits"), py::arg("dtype"));
  // What the infer bindings offer beyond their first version: 2 = infer_linear's bias and
  // whole_max_bytes arguments, and infer_dequantize.
  m.attr("INFER_VERSION") = 2;
  m.def("infer_isa", &vcon::infer_isa, "the ISA of the finalized-layer matmul kernels in use");
  m.def("infer_isas", &vcon::infer_isas, "the finalized-layer kernel ISAs this build and CPU run");
  m.def("set_infer_isa", &vcon::set_infer_isa, "force one of infer_isas() or 'auto'", py::arg("name"));
  m.def("isa", &vcon::current_isa, "the ISA of the kernels in use: 'default' or 'avx2'");
  m.def("compiled_isas", &vcon::compiled_isas, "the ISAs compiled into this build");
  m.def("set_isa", &vcon::set_isa, "force 'default' or 'avx2' kernels, or 'auto'", py::arg("name"));
  m.def("workspace_bytes", &vcon::workspace_bytes, "bytes held by this thread's W_eff workspace");
  m.def("release_workspace", &vcon::release_workspace, "free this thread's W_eff workspace");
  m.def("threshold_hint_stats", &vcon::threshold_hint_stats,
        "(hits, misses) of the one-pass per-layer threshold path since the last clear");
  m.def("clear_threshold_hints", &vcon::clear_threshold_hints, "forget every per-layer threshold hint");
}
