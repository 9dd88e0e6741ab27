// CPU kernels of FiLM, y = gamma[n,c]·x + beta[n,c] (docs/math.md), gamma and beta
// [N, C] or [C]: one affine pass forward; backward one affine pass for dx and one pass of
// per-plane sums for dgamma, dbeta (summed over the batch for a [C] one). The passes are the
// BN's (batch_norm/cpu_passes.h). Registered here for the CPU key: film and film_backward
// compute in x's dtype when it is float32/float64 and gamma, beta, dy have it too, else in the
// accumulation dtype (csrc/accumulate.h) with the outputs cast back.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "../accumulate.h"
#include "../batch_norm/cpu_passes.h"
#include "../spec.h"
#include "checks.h"

namespace fastrobust::cpu {
namespace {

// The [N, C] coefficients of t (a [C] one repeated per sample), `fill` where t is None.
template <typename T>
std::vector<T> per_plane(const OptTensor& t, int64_t N, int64_t C, T fill) {
  std::vector<T> out(N * C, fill);
  if (!t) return out;
  const T* p = t->data_ptr<T>();
  for (int64_t n = 0; n < N; ++n)
    std::copy(p + (t->dim() == 1 ? 0 : n * C), p + (t->dim() == 1 ? C : (n + 1) * C),
              out.begin() + n * C);
  return out;
}

// Per-plane sums [N, C] as the gradient tensor: [C] (summed over n in order) or [N, C].
template <typename T>
at::Tensor planes_to_grad(const Scratch<T>& sums, int64_t N, int64_t C, bool per_channel,
                          const at::Tensor& x) {
  if (!per_channel) {
    auto g = at::empty({N, C}, x.options());
    std::copy(sums.begin(), sums.end(), g.data_ptr<T>());
    return g;
  }
  auto g = at::empty({C}, x.options());
  T* out = g.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    double acc = 0;  // N terms; fp64 accumulation costs nothing at this size
    for (int64_t n = 0; n < N; ++n) acc += double(sums[n * C + c]);
    out[c] = T(acc);
  }
  return g;
}

at::Tensor film_forward(const at::Tensor& x_in, const OptTensor& gamma, const OptTensor& beta) {
  const int64_t N = x_in.size(0), C = x_in.size(1);
  checks::kernel_operand("film", "gamma", gamma, x_in);
  checks::kernel_operand("film", "beta", beta, x_in);
  auto [x, v] = as_view(x_in);
  auto y = empty_like_view(x, v);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "film_forward", [&] {
    using T = scalar_t;
    const auto A = per_plane<T>(gamma, N, C, T(1)), D = per_plane<T>(beta, N, C, T(0));
    affine_pass<T>(v, walk<const T>(x, v), walk<T>(y, as_view(y).second), A.data(), D.data(),
                   false);
  });
  return y;
}

std::vector<at::Tensor> film_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                      const OptTensor& gamma, bool need_x, bool need_gamma,
                                      bool need_beta, bool per_channel_gamma,
                                      bool per_channel_beta) {
  const int64_t N = x_in.size(0), C = x_in.size(1);
  checks::kernel_operand("film", "gamma", gamma, x_in);
  auto [x, v] = as_view(x_in);
  auto [dy, dyv] = match_layout(dy_in, x, v);
  at::Tensor dx = x.new_empty({0}), dgamma = x.new_empty({0}), dbeta = x.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "film_backward", [&] {
    using T = scalar_t;
    if (need_x) {
      dx = empty_like_view(x, v);
      const auto A = per_plane<T>(gamma, N, C, T(1)), D = per_plane<T>(OptTensor(), N, C, T(0));
      affine_pass<T>(v, walk<const T>(dy, dyv), walk<T>(dx, as_view(dx).second), A.data(),
                     D.data(), false);
    }
    if (need_gamma || need_beta) {
      std::vector<T> zero(N * C, T(0));
      const auto G = plane_grad_sums<T>(v, walk<const T>(dy, dyv), walk<const T>(x, v),
                                        PlaneRows<T>(zero.data(), C), nullptr, nullptr);
      if (need_gamma) dgamma = planes_to_grad<T>(G.b, N, C, per_channel_gamma, x);
      if (need_beta) dbeta = planes_to_grad<T>(G.a, N, C, per_channel_beta, x);
    }
  });
  return {dx, dgamma, dbeta};
}

// --- the ops' CPU kernels ---------------------------------------------------------------------

at::Tensor film(const at::Tensor& x, const OptTensor& gamma, const OptTensor& beta) {
  checks::film(x, gamma, beta);
  if (native_dtypes(x, {&gamma, &beta})) return film_forward(x, gamma, beta);
  const auto dt = acc_dtype(x);
  return film_forward(x.to(dt), in_dtype(gamma, dt), in_dtype(beta, dt)).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> film_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const OptTensor& gamma,
    std::array<bool, kNumFilmGrads> needs, std::array<bool, 2> per_channel) {
  checks::film_backward(dy, x, gamma, needs, per_channel);
  const OptTensor dyo = dy;
  std::vector<at::Tensor> g;
  if (native_dtypes(x, {&dyo, &gamma})) {
    g = film_backward(dy, x, gamma, needs[kFilmX], needs[kFilmGamma], needs[kFilmBeta],
                      per_channel[0], per_channel[1]);
  } else {
    const auto dt = acc_dtype(x);
    g = film_backward(dy.to(dt), x.to(dt), in_dtype(gamma, dt), needs[kFilmX],
                      needs[kFilmGamma], needs[kFilmBeta], per_channel[0], per_channel[1]);
    if (needs[kFilmX]) g[0] = g[0].to(x.scalar_type());
  }
  return {g[0], g[1], g[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrobust, CPU, m) {
  m.impl("film", &film);
  m.impl("film_backward", &film_backward_cpu);
}

}  // namespace fastrobust::cpu
