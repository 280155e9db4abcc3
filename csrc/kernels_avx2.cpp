// The row kernels compiled with -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2
// (setup.py adds those flags to this file only, on x86-64). ops.cpp calls them only when
// the CPU has AVX2 (and torch's ATEN_CPU_CAPABILITY allows it).
//
// Nothing here may run before that check: no static initializers (the table is built on
// first use), no at::Tensor, no std containers. setup.py links this object last, so any
// inline function shared with the baseline objects keeps its baseline copy.
#define VCON_ISA isa_avx2
#include "kernels.h"

namespace vcon {

const KernelTable& kernels_avx2() {
  static const KernelTable table = isa_avx2::make_table("avx2");
  return table;
}

}  // namespace vcon
