// CUDA kernels of the PGD steps (shared/DESIGN.md §2.5): torch-free; the launchers are
// declared in pgd_cuda.h. The per-element math is csrc/pgd_math.h's, shared with the CPU
// kernels. Sample offsets are int64; statistics accumulate in fp32 (fp64 for fp64 data).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../spec.h"
#include "dtype_dispatch.cuh"
#include "pgd_cuda.h"

namespace fastrobust::cuda {
namespace {

#include "../pgd_math.h"

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T>
__device__ __forceinline__ typename Acc<T>::type load(const T* p, int64_t i) {
  return static_cast<typename Acc<T>::type>(p[i]);
}
template <> __device__ __forceinline__ float load(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <> __device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <typename T, typename A> __device__ __forceinline__ T cast(A v) {
  return static_cast<T>(v);
}
template <> __device__ __forceinline__ __half cast(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 cast(float v) {
  return __float2bfloat16_rn(v);
}

constexpr int kThreads = 256;

// A sample's eps (or the scalar); a negative per-sample eps poisons the sample with NaN: the
// device cannot raise without a host sync (CPU tensors raise at once).
template <typename A>
__device__ __forceinline__ A strength(const void* t, double v, int64_t n) {
  return t ? static_cast<const A*>(t)[n] : static_cast<A>(v);
}

template <typename T, bool SIGN>
__global__ void linf_kernel(PgdArgs a) {
  using A = typename Acc<T>::type;
  const int64_t total = a.N * a.S;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / a.S;
    const A e = strength<A>(a.eps_t, a.eps, n), al = strength<A>(a.alpha_t, a.alpha, n);
    const A g = load(static_cast<const T*>(a.grad), i);
    A r = linf_value(load(static_cast<const T*>(a.x_adv), i), SIGN ? sign_(g) : g,
                     load(static_cast<const T*>(a.x_nat), i), e, al, A(a.clip_min),
                     A(a.clip_max));
    if (e < A(0)) r = A(NAN);
    static_cast<T*>(a.out)[i] = cast<T>(r);
  }
}

template <typename A>
__device__ A block_sum(A v) {
  __shared__ A part[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? part[threadIdx.x] : A(0);
  if (threadIdx.x < 32)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;  // valid in thread 0
}

// One block per sample: ‖g‖, then ‖δ‖ of the unprojected step; writes the ball factor and
// the step scale (scratch[n], scratch[N + n]).
template <typename T>
__global__ void l2_norms_kernel(PgdArgs a) {
  using A = typename Acc<T>::type;
  const int64_t n = blockIdx.x, base = n * a.S;
  const T* g = static_cast<const T*>(a.grad);
  A gg = 0;
  for (int64_t j = threadIdx.x; j < a.S; j += blockDim.x) {
    const A v = load(g, base + j);
    gg += v * v;
  }
  gg = block_sum(gg);
  __shared__ A step;
  if (threadIdx.x == 0)
    step = A(l2_step_scale(double(strength<A>(a.alpha_t, a.alpha, n)), sqrt(double(gg))));
  __syncthreads();
  A dd = 0;
  for (int64_t j = threadIdx.x; j < a.S; j += blockDim.x) {
    const A d = load(static_cast<const T*>(a.x_adv), base + j) + step * load(g, base + j) -
                load(static_cast<const T*>(a.x_nat), base + j);
    dd += d * d;
  }
  dd = block_sum(dd);
  if (threadIdx.x == 0) {
    const A e = strength<A>(a.eps_t, a.eps, n);
    A f = A(l2_ball_factor(sqrt(double(dd)), double(e)));
    static_cast<A*>(a.scratch)[n] = e < A(0) ? A(NAN) : f;
    static_cast<A*>(a.scratch)[a.N + n] = step;
  }
}

template <typename T>
__global__ void l2_update_kernel(PgdArgs a) {
  using A = typename Acc<T>::type;
  const A* sc = static_cast<const A*>(a.scratch);
  const int64_t total = a.N * a.S;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / a.S;
    const A xn = load(static_cast<const T*>(a.x_nat), i);
    const A d = load(static_cast<const T*>(a.x_adv), i) +
                sc[a.N + n] * load(static_cast<const T*>(a.grad), i) - xn;
    static_cast<T*>(a.out)[i] = cast<T>(clamp_(xn + d * sc[n], A(a.clip_min), A(a.clip_max)));
  }
}

// One block per sample: the divisor mean(|g|) of MI-FGSM.
template <typename T>
__global__ void mifgsm_mean_kernel(PgdArgs a) {
  using A = typename Acc<T>::type;
  const int64_t n = blockIdx.x, base = n * a.S;
  A s = 0;
  for (int64_t j = threadIdx.x; j < a.S; j += blockDim.x)
    s += fabs(load(static_cast<const T*>(a.grad), base + j));
  s = block_sum(s);
  if (threadIdx.x == 0)
    static_cast<A*>(a.scratch)[n] = A(mifgsm_divisor(double(s), static_cast<long long>(a.S)));
}

template <typename T>
__global__ void mifgsm_update_kernel(PgdArgs a) {
  using A = typename Acc<T>::type;
  const A* div = static_cast<const A*>(a.scratch);
  const int64_t total = a.N * a.S;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / a.S;
    const A e = strength<A>(a.eps_t, a.eps, n), al = strength<A>(a.alpha_t, a.alpha, n);
    T* buf = static_cast<T*>(a.buf);
    const A b = load(static_cast<const T*>(a.grad), i) / div[n] + load(buf, i) * A(a.decay);
    buf[i] = cast<T>(b);
    A r = linf_value(load(static_cast<const T*>(a.x_adv), i), sign_(b),
                     load(static_cast<const T*>(a.x_nat), i), e, al, A(a.clip_min),
                     A(a.clip_max));
    if (e < A(0)) r = A(NAN);
    static_cast<T*>(a.out)[i] = cast<T>(r);
  }
}

unsigned elementwise_blocks(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return unsigned(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);  // grid-stride beyond
}

template <typename T>
const char* pgd_typed(const PgdArgs& a, cudaStream_t s) {
  const unsigned blocks = elementwise_blocks(a.N * a.S);
  if (a.mode == kL2) {
    l2_norms_kernel<T><<<unsigned(a.N), kThreads, 0, s>>>(a);
    l2_update_kernel<T><<<blocks, kThreads, 0, s>>>(a);
  } else if (a.mode == kLinfSign) {
    linf_kernel<T, true><<<blocks, kThreads, 0, s>>>(a);
  } else {
    linf_kernel<T, false><<<blocks, kThreads, 0, s>>>(a);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* mifgsm_typed(const PgdArgs& a, cudaStream_t s) {
  mifgsm_mean_kernel<T><<<unsigned(a.N), kThreads, 0, s>>>(a);
  mifgsm_update_kernel<T><<<elementwise_blocks(a.N * a.S), kThreads, 0, s>>>(a);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* pgd_update(const PgdArgs& a, void* stream) {
  if (a.N * a.S == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return by_dtype(a.dtype, [&](auto t) { return pgd_typed<decltype(t)>(a, s); },
                  "pgd_update: unsupported dtype");
}

const char* mifgsm_update(const PgdArgs& a, void* stream) {
  if (a.N * a.S == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return by_dtype(a.dtype, [&](auto t) { return mifgsm_typed<decltype(t)>(a, s); },
                  "mifgsm_update: unsupported dtype");
}

}  // namespace fastrobust::cuda
