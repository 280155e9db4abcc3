// The finalized-layer matmul kernels for the baseline ISA (what runs without AVX2).
#define VCON_ISA infer_isa_default
#include "infer_kernels.h"

namespace vcon {

const InferTable& infer_default() {
  static const InferTable table = infer_isa_default::make_infer_table("default");
  return table;
}

}  // namespace vcon
