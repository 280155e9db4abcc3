// The row kernels for the baseline ISA of the build (SSE2 on x86-64; NEON etc. elsewhere).
// Always compiled: it is what runs when the CPU (or ATEN_CPU_CAPABILITY) lacks AVX2.
#define VCON_ISA isa_default
#include "kernels.h"

namespace vcon {

const KernelTable& kernels_default() {
  static const KernelTable table = isa_default::make_table("default");
  return table;
}

}  // namespace vcon
