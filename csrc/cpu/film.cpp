// CPU kernels of FiLM, y = gamma[n,c]·x + beta[n,c] (shared/DESIGN.md §2.3): one affine pass
// forward; backward one affine pass for dx and one pass of per-plane sums for dgamma, dbeta.
#include "multi_bn.h"

#include <algorithm>
#include <vector>

#include "passes.h"

namespace fastrobust::cpu {

at::Tensor film_forward(const at::Tensor& x_in, const OptTensor& gamma, const OptTensor& beta) {
  TORCH_CHECK(x_in.dim() >= 2, "film: x must be [N, C, *spatial]");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  check_float(gamma, x_in, "film", "gamma", {N, C});
  check_float(beta, x_in, "film", "beta", {N, C});
  auto [x, v] = as_view(x_in);
  auto y = empty_like_view(x, v);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "film_forward", [&] {
    using T = scalar_t;
    std::vector<T> A(N * C, T(1)), D(N * C, T(0));
    if (gamma) std::copy(gamma->data_ptr<T>(), gamma->data_ptr<T>() + N * C, A.begin());
    if (beta) std::copy(beta->data_ptr<T>(), beta->data_ptr<T>() + N * C, D.begin());
    affine_pass<T>(v, walk<const T>(x, v), walk<T>(y, as_view(y).second), A.data(), D.data(),
                   false);
  });
  return y;
}

std::vector<at::Tensor> film_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                      const OptTensor& gamma, bool need_x, bool need_gamma,
                                      bool need_beta) {
  TORCH_CHECK(x_in.dim() >= 2, "film: x must be [N, C, *spatial]");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  check_float(gamma, x_in, "film", "gamma", {N, C});
  auto [x, v] = as_view(x_in);
  auto [dy, dyv] = match_layout(dy_in, x, v);
  at::Tensor dx = x.new_empty({0}), dgamma = x.new_empty({0}), dbeta = x.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "film_backward", [&] {
    using T = scalar_t;
    if (need_x) {
      dx = empty_like_view(x, v);
      std::vector<T> A(N * C, T(1)), D(N * C, T(0));
      if (gamma) std::copy(gamma->data_ptr<T>(), gamma->data_ptr<T>() + N * C, A.begin());
      affine_pass<T>(v, walk<const T>(dy, dyv), walk<T>(dx, as_view(dx).second), A.data(),
                     D.data(), false);
    }
    if (need_gamma || need_beta) {
      std::vector<T> zero(N * C, T(0));
      const auto G = plane_grad_sums<T>(v, walk<const T>(dy, dyv), walk<const T>(x, v),
                                        zero.data(), nullptr, nullptr);
      if (need_gamma) {
        dgamma = at::empty({N, C}, x.options());
        std::copy(G.b.begin(), G.b.end(), dgamma.data_ptr<T>());
      }
      if (need_beta) {
        dbeta = at::empty({N, C}, x.options());
        std::copy(G.a.begin(), G.a.end(), dbeta.data_ptr<T>());
      }
    }
  });
  return {dx, dgamma, dbeta};
}

}  // namespace fastrobust::cpu
