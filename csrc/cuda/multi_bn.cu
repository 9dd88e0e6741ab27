// CUDA kernels of the routed / mixed BN family (shared/DESIGN.md §2.1-2.4): torch-free; the
// launchers are declared in multi_bn_cuda.h. Each kernel is a grid-stride loop over one of
// multi_bn_body.h's bodies, the code the host emulation runs under the CPU tests; the
// per-element formulas are csrc/bn_math.h's, shared with the CPU kernels. Statistics in fp32
// (fp64 for fp64 data); int64 offsets throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "dtype_dispatch.cuh"
#include "multi_bn_cuda.h"

namespace fastrobust::cuda {
namespace {

#include "../bn_math.h"

template <typename A, typename T>
__host__ __device__ __forceinline__ A ld(const T* p, int64_t i) {
  return static_cast<A>(p[i]);
}
template <>
__host__ __device__ __forceinline__ float ld<float, __half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <>
__host__ __device__ __forceinline__ float ld<float, __nv_bfloat16>(const __nv_bfloat16* p,
                                                                   int64_t i) {
  return __bfloat162float(p[i]);
}
template <typename T, typename A>
__host__ __device__ __forceinline__ void st(T* p, int64_t i, A v) {
  p[i] = static_cast<T>(v);
}
template <>
__host__ __device__ __forceinline__ void st<__half, float>(__half* p, int64_t i, float v) {
  p[i] = __float2half_rn(v);
}
template <>
__host__ __device__ __forceinline__ void st<__nv_bfloat16, float>(__nv_bfloat16* p, int64_t i,
                                                                  float v) {
  p[i] = __float2bfloat16_rn(v);
}

#include "multi_bn_body.h"

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

constexpr int kThreads = 256;

#define FASTROBUST_GRID_LOOP(total)                                                    \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (total);        \
       i += int64_t(gridDim.x) * blockDim.x)

template <typename T>
__global__ void __launch_bounds__(kThreads) moments_kernel(BnArgs a) {
  FASTROBUST_GRID_LOOP(a.splits * a.N * a.C) moments_body<T, typename Acc<T>::type>(a, i);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) stats_kernel(BnArgs a) {
  FASTROBUST_GRID_LOOP(a.K * a.C) stats_body<T, typename Acc<T>::type>(a, i);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) affine_kernel(BnArgs a) {
  FASTROBUST_GRID_LOOP(affine_total(a)) affine_body<T, typename Acc<T>::type>(a, i);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_sums_kernel(BnArgs a) {
  FASTROBUST_GRID_LOOP(a.splits * a.N * a.C) grad_sums_body<T, typename Acc<T>::type>(a, i);
}
template <typename T>
__global__ void __launch_bounds__(kThreads) grads_kernel(BnArgs a) {
  FASTROBUST_GRID_LOOP(a.K * a.C) grads_body<T, typename Acc<T>::type>(a, i);
}
// dx and the per-plane gradients, and ∂L/∂mix (an index space of max(runs, N·K)).
template <typename T>
__global__ void __launch_bounds__(kThreads) dx_kernel(BnArgs a, bool needs_dx) {
  using A = typename Acc<T>::type;
  const int64_t planes = a.N * a.C * runs(a), mix = a.dmix ? a.N * a.K : 0;
  FASTROBUST_GRID_LOOP(planes > mix ? planes : mix) {
    if (i < mix) dmix_body<A>(a, i);
    if (i < planes) dx_body<T, A>(a, needs_dx, i);
  }
}

#undef FASTROBUST_GRID_LOOP

unsigned blocks(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return unsigned(b < 1 ? 1 : (b > (int64_t(1) << 20) ? (int64_t(1) << 20) : b));
}

template <typename T>
const char* forward_t(const BnArgs& a, cudaStream_t s) {
  if (a.batch_stats)
    moments_kernel<T><<<blocks(a.splits * a.N * a.C), kThreads, 0, s>>>(a);
  stats_kernel<T><<<blocks(a.K * a.C), kThreads, 0, s>>>(a);
  affine_kernel<T><<<blocks(affine_total(a)), kThreads, 0, s>>>(a);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <typename T>
const char* backward_t(const BnArgs& a, bool needs_dx, cudaStream_t s) {
  if (grads_ran(a)) {
    grad_sums_kernel<T><<<blocks(a.splits * a.N * a.C), kThreads, 0, s>>>(a);
    grads_kernel<T><<<blocks(a.K * a.C), kThreads, 0, s>>>(a);
  }
  const int64_t planes = a.N * a.C * runs(a), mix = a.dmix ? a.N * a.K : 0;
  dx_kernel<T><<<blocks(planes > mix ? planes : mix), kThreads, 0, s>>>(a, needs_dx);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

const char* bn_forward(const BnArgs& a, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return by_dtype(a.dtype, [&](auto t) { return forward_t<decltype(t)>(a, s); },
                  "bn_forward: unsupported dtype");
}

const char* bn_backward(const BnArgs& a, bool needs_dx, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return by_dtype(a.dtype, [&](auto t) { return backward_t<decltype(t)>(a, needs_dx, s); },
                  "bn_backward: unsupported dtype");
}

}  // namespace fastrobust::cuda
