// FASTROBUST_LAUNCH_ON_CUDA("op", ...): the CUDA key's kernel of the listed ops is the launch
// path (cuda.cpp: their Triton kernels' plans replayed from C++). One line in each family's
// ops.cpp; nothing without a CUDA build of torch.
#pragma once
#include <torch/library.h>

#include <initializer_list>

#ifdef FASTROBUST_WITH_CUDA
namespace fastrobust::plans {
void launch_on_cuda(torch::Library& m, std::initializer_list<const char*> names);
}  // namespace fastrobust::plans
#define FASTROBUST_LAUNCH_ON_CUDA(...)                         \
  TORCH_LIBRARY_IMPL(fastrobust, CUDA, m) {                    \
    ::fastrobust::plans::launch_on_cuda(m, {__VA_ARGS__});      \
  }                                                            \
  static_assert(true, "")
#else
#define FASTROBUST_LAUNCH_ON_CUDA(...) static_assert(true, "")
#endif
