// The CPU kernels' innermost loops built twice, written once: a family's leaf file (no
// includes of its own but its math header, no calls into other code) is compiled for the
// baseline ISA in namespace isa_base and under `#pragma GCC target("avx2,fma")` in namespace
// isa_avx2, so nothing compiled for AVX2 can leak into the baseline path; FASTROBUST_PICK_ISA
// chooses one at run time, so one binary serves any x86-64 CPU at its best speed. Use:
//
//   #define FASTROBUST_ISA_LEAF "batch_norm/cpu_leaf.inc"   (relative to csrc/)
//   #include "../cpu_isa.h"
//   ... FASTROBUST_PICK_ISA(MAKE) ...   MAKE(ns): the leaf table built from namespace ns
//
// No include guard, by design: each kernel file includes it once for its own leaf file.
#ifndef FASTROBUST_ISA_LEAF
#error "define FASTROBUST_ISA_LEAF (the leaf file) before including cpu_isa.h"
#endif

namespace isa_base {
#include FASTROBUST_ISA_LEAF
}  // namespace isa_base

#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include FASTROBUST_ISA_LEAF
}  // namespace isa_avx2
#pragma GCC pop_options
#ifndef FASTROBUST_PICK_ISA
#define FASTROBUST_PICK_ISA(MAKE)                                                   \
  ((__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? MAKE(isa_avx2) \
                                                                      : MAKE(isa_base))
#endif
#else
#ifndef FASTROBUST_PICK_ISA
#define FASTROBUST_PICK_ISA(MAKE) MAKE(isa_base)
#endif
#endif

#undef FASTROBUST_ISA_LEAF
