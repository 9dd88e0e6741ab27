// The CUDA BN kernels' bodies (csrc/cuda/multi_bn_body.h) run on the host, index by index in
// the launch order of csrc/cuda/multi_bn.cu, behind the same binding (csrc/cuda/bn_binding.h)
// the CUDA registration uses. Not an op and no fast path: the CPU tests compare it with the
// CPU kernels (tests/test_cuda_bodies.py), so the CUDA code's algebra, indexing and binding are
// tested on machines without a GPU. float32 / float64 only (the host has no __half).
#include "cuda_emulation.h"

#include <cmath>

#include "../cuda/bn_binding.h"

namespace fastrobust::cuda {
namespace {

#include "../bn_math.h"

template <typename A, typename T>
inline A ld(const T* p, int64_t i) {
  return static_cast<A>(p[i]);
}
template <typename T, typename A>
inline void st(T* p, int64_t i, A v) {
  p[i] = static_cast<T>(v);
}

#include "../cuda/multi_bn_body.h"

template <typename F>
void grid(int64_t total, const F& body) {
  for (int64_t i = 0; i < total; ++i) body(i);
}

template <typename T>
void forward_t(const BnArgs& a) {
  using A = T;
  if (a.batch_stats) grid(a.splits * a.N * a.C, [&](int64_t i) { moments_body<T, A>(a, i); });
  grid(a.K * a.C, [&](int64_t i) { stats_body<T, A>(a, i); });
  grid(affine_total(a), [&](int64_t i) { affine_body<T, A>(a, i); });
}

template <typename T>
void backward_t(const BnArgs& a, bool needs_dx) {
  using A = T;
  if (grads_ran(a)) {
    grid(a.splits * a.N * a.C, [&](int64_t i) { grad_sums_body<T, A>(a, i); });
    grid(a.K * a.C, [&](int64_t i) { grads_body<T, A>(a, i); });
  }
  const int64_t planes = a.N * a.C * runs(a), mix = a.dmix ? a.N * a.K : 0;
  grid(planes > mix ? planes : mix, [&](int64_t i) {
    if (i < mix) dmix_body<A>(a, i);
    if (i < planes) dx_body<T, A>(a, needs_dx, i);
  });
}

void check_host(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu() &&
                        (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
                    "emulated CUDA BN: x must be a float32/float64 CPU tensor");
}

}  // namespace

std::vector<at::Tensor> emulated_bn_forward(
    const at::Tensor& x, const OptTensor& branch, const OptTensor& mix, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, const OptTensor& input_scale,
    const OptTensor& film_gamma, const OptTensor& film_beta, int64_t K, bool training,
    double momentum, bool cumulative, double eps, bool relu) {
  check_host(x);
  return bn_forward_with(x, branch, mix, weight, bias, running_mean, running_var,
                         num_batches_tracked, input_scale, film_gamma, film_beta, K, training,
                         momentum, cumulative, eps, relu, [](const BnArgs& a) {
                           if (a.dtype == Dtype::kDouble) forward_t<double>(a);
                           else forward_t<float>(a);
                         });
}

std::vector<at::Tensor> emulated_bn_backward(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& branch, const OptTensor& mix,
    const OptTensor& weight, const OptTensor& bias, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& planes, const OptTensor& input_scale,
    const OptTensor& film_gamma, const OptTensor& film_beta, int64_t K, bool batch_stats,
    bool relu, std::vector<bool> needs) {
  check_host(x);
  TORCH_CHECK_VALUE(needs.size() == kNumBNGrads, "emulated CUDA BN: needs must have ",
                    int(kNumBNGrads), " flags");
  std::array<bool, kNumBNGrads> n{};
  for (int i = 0; i < kNumBNGrads; ++i) n[i] = needs[i];
  return bn_backward_with(dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale,
                          film_gamma, film_beta, K, batch_stats, relu, n,
                          [](const BnArgs& a, bool needs_dx) {
                            if (a.dtype == Dtype::kDouble) backward_t<double>(a, needs_dx);
                            else backward_t<float>(a, needs_dx);
                          });
}

}  // namespace fastrobust::cuda
