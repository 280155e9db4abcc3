// The finalized-layer matmul kernels compiled with -mavx2 -mfma -mf16c (setup.py adds the
// flags to this file only). infer.cpp calls them only when the CPU has AVX2 and FMA.
// Nothing here may run before that check: no static initializers (the table is built on
// first use), no at::Tensor, no std containers.
#define VCON_ISA infer_isa_avx2
#include "infer_kernels.h"

namespace vcon {

const InferTable& infer_avx2() {
  static const InferTable table = infer_isa_avx2::make_infer_table("avx2");
  return table;
}

}  // namespace vcon
