// The launchers' dtype switch, once: by_dtype(d, f, msg) calls f with a value of d's element
// type (float, double, __half, __nv_bfloat16) and returns its result (null or a CUDA error's
// text), or msg for a dtype it does not know.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "pgd_cuda.h"  // Dtype

namespace fastrobust::cuda {

template <typename F>
const char* by_dtype(Dtype d, const F& f, const char* unsupported) {
  switch (d) {
    case Dtype::kFloat: return f(float{});
    case Dtype::kDouble: return f(double{});
    case Dtype::kHalf: return f(__half{});
    case Dtype::kBFloat16: return f(__nv_bfloat16{});
  }
  return unsupported;
}

}  // namespace fastrobust::cuda
