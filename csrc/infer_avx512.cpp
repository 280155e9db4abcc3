// The finalized-layer matmul kernels compiled with AVX-512 (F, BW, VL, DQ) on top of the AVX2
// flags (setup.py adds them to this file only): the AVX2 kernels plus infer_q4_avx512.h and
// infer_nm_avx512.h.
// infer.cpp calls them only when the CPU has those extensions. As in infer_avx2.cpp, nothing
// here may run before that check: no static initializers, no at::Tensor, no std containers.
#define VCON_ISA infer_isa_avx512
#define VCON_INFER_AVX512
#include "infer_kernels.h"

namespace vcon {

const InferTable& infer_avx512() {
  static const InferTable table = infer_isa_avx512::make_infer_table("avx512");
  return table;
}

}  // namespace vcon
