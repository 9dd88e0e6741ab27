// CPU kernels of the sample-routed multi-branch batch norm (shared/DESIGN.md §2.1).
//
// Layouts served natively, as [N, C, S] with S = prod(spatial):
//   planes        x[n, c, s] at n*sN + c*S + s   (NCHW-contiguous samples; sN may be anything)
//   channels_last x[n, c, s] at n*sN + s*C + c   (NHWC-contiguous samples)
// anything else is made contiguous once (the only copy this file makes).
//
// Statistics: every (n, c) plane is reduced in two passes while it sits in L1 (mean, then
// Σ(x-mean)²), and planes are merged into their branch with Chan's formula in double, so the
// variance never suffers the cancellation of Σx² - (Σx)²/m. In the planes layout one thread owns
// a channel from statistics to output, so the second read of x comes from L2, not DRAM.
#include "multi_bn.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace fastrobust::cpu {
namespace {

enum class Layout { Planes, ChannelsLast };

struct View {
  Layout layout;
  int64_t N, C, S, sN;
};

// Returns x (or a contiguous copy) and how to walk it.
std::pair<at::Tensor, View> as_view(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = C == 0 ? 0 : (N == 0 ? 0 : x.numel() / (N * C));
  // Spatial dims must be dense among themselves in either order.
  auto dense_spatial = [&](int64_t inner) {
    int64_t expect = inner;
    for (int64_t d = x.dim() - 1; d >= 2; --d) {
      if (x.size(d) != 1 && x.stride(d) != expect) return false;
      expect *= x.size(d);
    }
    return true;
  };
  if ((C == 1 || x.stride(1) == S) && dense_spatial(1)) {
    return {x, View{Layout::Planes, N, C, S, x.stride(0)}};
  }
  if (x.stride(1) == 1 && dense_spatial(C)) {
    return {x, View{Layout::ChannelsLast, N, C, S, x.stride(0)}};
  }
  auto xc = x.contiguous();
  return {xc, View{Layout::Planes, N, C, S, xc.stride(0)}};
}

// A tensor shaped like x with the same walk (same layout, dense).
at::Tensor empty_like_view(const at::Tensor& x, const View& v) {
  if (v.layout == Layout::ChannelsLast && x.dim() >= 3) {
    // channels-last for any number of spatial dims: permute to N, spatial..., C and back.
    std::vector<int64_t> perm{0};
    for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
    perm.push_back(1);
    auto t = at::empty(x.permute(perm).sizes(), x.options());
    std::vector<int64_t> inv(x.dim());
    for (int64_t i = 0; i < x.dim(); ++i) inv[perm[i]] = i;
    return t.permute(inv);
  }
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

// dy must be walked like x; it is brought to x's layout when autograd hands us something else
// (e.g. the stride-0 gradient of y.sum()).
at::Tensor match_layout(const at::Tensor& t, const at::Tensor& like, const View& v) {
  auto [tt, tv] = as_view(t);
  if (tv.layout == v.layout) return tt;
  auto out = empty_like_view(like, v);
  out.copy_(t);
  return out;
}

// One plane's mean and M2 = Σ(x - mean)², in the input's precision.
template <typename T>
inline void plane_moments(const T* p, int64_t S, T& mean, T& m2) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < S; ++i) s += p[i];
  const T mu = s / static_cast<T>(S);
  T q = 0;
#pragma omp simd reduction(+ : q)
  for (int64_t i = 0; i < S; ++i) {
    const T d = p[i] - mu;
    q += d * d;
  }
  mean = mu;
  m2 = q;
}

// Welford/Chan accumulator of a (branch, channel) group.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  inline void merge(double nb, double mb, double m2b) {
    if (nb == 0) return;
    const double tot = n + nb;
    const double delta = mb - mean;
    mean += delta * nb / tot;
    m2 += m2b + delta * delta * n * nb / tot;
    n = tot;
  }
};

// Validates branch ids and counts samples per branch (host-side: CPU tensors, no device sync).
std::vector<int64_t> branch_counts(const at::Tensor& branch, int64_t K) {
  std::vector<int64_t> counts(K, 0);
  const int64_t* b = branch.data_ptr<int64_t>();
  for (int64_t n = 0; n < branch.numel(); ++n) {
    TORCH_CHECK(b[n] >= 0 && b[n] < K, "multi_batch_norm: branch id ", b[n], " at sample ", n,
                " is out of range [0, ", K, ")");
    counts[b[n]]++;
  }
  return counts;
}

template <typename T>
struct Params {
  const T* weight;  // [K, C] or null
  const T* bias;    // [K, C] or null
  inline T w(int64_t i) const { return weight ? weight[i] : T(1); }
  inline T b(int64_t i) const { return bias ? bias[i] : T(0); }
};

// out[n, c, s] = A[k, c] * u + B[k, c] * v + D[k, c], k = branch[n]; v may be null.
// The one elementwise pass of the forward (y = a·x + b) and of the backward (dx = α·dy + β·x + γ).
template <typename T>
void routed_affine(const View& v, const int64_t* br, const T* u, const T* w, T* out,
                   const T* A, const T* B, const T* D) {
  const int64_t C = v.C, S = v.S;
  if (v.layout == Layout::Planes) {
    at::parallel_for(0, v.N * C, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t n = i / C, c = i % C, kc = br[n] * C + c;
        const int64_t off = n * v.sN + c * S;
        const T a = A[kc], bb = B ? B[kc] : T(0), d = D[kc];
        const T* up = u + off;
        T* op = out + off;
        if (w) {
          const T* wp = w + off;
#pragma omp simd
          for (int64_t s = 0; s < S; ++s) op[s] = a * up[s] + bb * wp[s] + d;
        } else {
#pragma omp simd
          for (int64_t s = 0; s < S; ++s) op[s] = a * up[s] + d;
        }
      }
    });
  } else {
    at::parallel_for(0, v.N * S, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / S, s = r % S, k = br[n];
        const int64_t off = n * v.sN + s * C;
        const T* a = A + k * C;
        const T* d = D + k * C;
        const T* up = u + off;
        T* op = out + off;
        if (w) {
          const T* bb = B + k * C;
          const T* wp = w + off;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) op[c] = a[c] * up[c] + bb[c] * wp[c] + d[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) op[c] = a[c] * up[c] + d[c];
        }
      }
    });
  }
}

// Per-(branch, channel) moments of the batch: count is count_k*S, mean, M2.
template <typename T>
std::vector<Moments> batch_moments(const View& v, const int64_t* br, const T* x, int64_t K) {
  const int64_t C = v.C, S = v.S;
  std::vector<Moments> mom(K * C);
  if (v.layout == Layout::Planes) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t n = 0; n < v.N; ++n) {
          T mu, m2;
          plane_moments(x + n * v.sN + c * S, S, mu, m2);
          mom[br[n] * C + c].merge(double(S), double(mu), double(m2));
        }
      }
    });
    return mom;
  }
  // channels_last: each thread owns a range of samples and keeps its own [K, C] moments,
  // merged afterwards (few threads, tiny).
  const int64_t T_ = at::get_num_threads();
  std::vector<std::vector<Moments>> local(T_, std::vector<Moments>(K * C));
  at::parallel_for(0, v.N, 1, [&](int64_t n0, int64_t n1) {
    auto& acc = local[at::get_thread_num()];
    std::vector<T> sum(C), m2(C);
    for (int64_t n = n0; n < n1; ++n) {
      const T* xn = x + n * v.sN;
      std::fill(sum.begin(), sum.end(), T(0));
      std::fill(m2.begin(), m2.end(), T(0));
      for (int64_t s = 0; s < S; ++s) {
        const T* row = xn + s * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) sum[c] += row[c];
      }
      for (int64_t c = 0; c < C; ++c) sum[c] /= static_cast<T>(S);
      for (int64_t s = 0; s < S; ++s) {
        const T* row = xn + s * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T d = row[c] - sum[c];
          m2[c] += d * d;
        }
      }
      Moments* a = acc.data() + br[n] * C;
      for (int64_t c = 0; c < C; ++c) a[c].merge(double(S), double(sum[c]), double(m2[c]));
    }
  });
  std::vector<Moments> mom_all(K * C);
  for (auto& l : local)
    for (int64_t i = 0; i < K * C; ++i) mom_all[i].merge(l[i].n, l[i].mean, l[i].m2);
  return mom_all;
}

// Per-(branch, channel) Σdy and Σdy·(x - mean) of the batch.
template <typename T>
void grad_sums(const View& v, const int64_t* br, const T* dy, const T* x, const T* mean,
               int64_t K, std::vector<double>& sdy, std::vector<double>& sdyx) {
  const int64_t C = v.C, S = v.S;
  sdy.assign(K * C, 0.0);
  sdyx.assign(K * C, 0.0);
  if (v.layout == Layout::Planes) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t n = 0; n < v.N; ++n) {
          const int64_t kc = br[n] * C + c, off = n * v.sN + c * S;
          const T mu = mean[kc];
          const T* dp = dy + off;
          const T* xp = x + off;
          T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t s = 0; s < S; ++s) {
            s1 += dp[s];
            s2 += dp[s] * (xp[s] - mu);
          }
          sdy[kc] += s1;
          sdyx[kc] += s2;
        }
      }
    });
    return;
  }
  const int64_t T_ = at::get_num_threads();
  std::vector<std::vector<double>> l1(T_, std::vector<double>(K * C, 0.0)), l2 = l1;
  at::parallel_for(0, v.N, 1, [&](int64_t n0, int64_t n1) {
    const int64_t t = at::get_thread_num();
    std::vector<T> s1(C), s2(C);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t k = br[n];
      const T* mu = mean + k * C;
      std::fill(s1.begin(), s1.end(), T(0));
      std::fill(s2.begin(), s2.end(), T(0));
      for (int64_t s = 0; s < S; ++s) {
        const int64_t off = n * v.sN + s * C;
        const T* dp = dy + off;
        const T* xp = x + off;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          s1[c] += dp[c];
          s2[c] += dp[c] * (xp[c] - mu[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        l1[t][k * C + c] += s1[c];
        l2[t][k * C + c] += s2[c];
      }
    }
  });
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t i = 0; i < K * C; ++i) {
      sdy[i] += l1[t][i];
      sdyx[i] += l2[t][i];
    }
}

template <typename T>
void forward_impl(const View& v, const int64_t* br, const T* x, T* y, Params<T> p, int64_t K,
                  bool batch_stats, T* rmean, T* rvar, int64_t* nbt, bool update,
                  double momentum, bool cumulative, double eps,
                  const std::vector<int64_t>& counts, T* mean_out, T* invstd_out) {
  const int64_t C = v.C, KC = K * C;
  std::vector<T> A(KC), D(KC);
  if (batch_stats) {
    auto mom = batch_moments(v, br, x, K);
    for (int64_t k = 0; k < K; ++k) {
      const bool valid = update && counts[k] * v.S >= 2;
      const double m = (cumulative && nbt) ? 1.0 / double(nbt[k] + 1) : momentum;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = k * C + c;
        const double cnt = mom[i].n;
        const double var = cnt > 0 ? mom[i].m2 / cnt : 0.0;
        mean_out[i] = T(mom[i].mean);
        invstd_out[i] = T(1.0 / std::sqrt(var + eps));
        if (valid) {
          rmean[i] = T((1 - m) * double(rmean[i]) + m * mom[i].mean);
          rvar[i] = T((1 - m) * double(rvar[i]) + m * var * cnt / (cnt - 1));
        }
      }
      if (valid && nbt) nbt[k] += 1;
    }
  } else {
    for (int64_t i = 0; i < KC; ++i) {
      mean_out[i] = rmean[i];
      invstd_out[i] = T(1.0 / std::sqrt(double(rvar[i]) + eps));
    }
  }
  for (int64_t i = 0; i < KC; ++i) {
    A[i] = p.w(i) * invstd_out[i];
    D[i] = p.b(i) - mean_out[i] * A[i];
  }
  routed_affine<T>(v, br, x, nullptr, y, A.data(), nullptr, D.data());
}

template <typename T>
void backward_impl(const View& v, const int64_t* br, const T* dy, const T* x, T* dx,
                   Params<T> p, const T* mean, const T* invstd, int64_t K, bool batch_stats,
                   bool need_sums, const std::vector<int64_t>& counts, T* dweight, T* dbias) {
  const int64_t C = v.C, KC = K * C;
  std::vector<double> sdy, sdyx;
  if (batch_stats || need_sums) grad_sums(v, br, dy, x, mean, K, sdy, sdyx);
  std::vector<T> A(KC), B(KC), D(KC);
  for (int64_t k = 0; k < K; ++k) {
    const double m = std::max<double>(1.0, double(counts[k] * v.S));
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = k * C + c;
      const double r = invstd[i], w = p.w(i);
      if (need_sums) {
        dweight[i] = T(sdyx[i] * r);
        dbias[i] = T(sdy[i]);
      }
      A[i] = T(w * r);
      if (batch_stats) {
        // dx = w·r·(dy - Σdy/m - x̂·Σ(dy·x̂)/m), x̂ = (x - μ)·r, as α·dy + β·x + γ.
        const double beta = -w * r * r * r * sdyx[i] / m;
        B[i] = T(beta);
        D[i] = T(-w * r * sdy[i] / m - beta * double(mean[i]));
      } else {
        B[i] = T(0);
        D[i] = T(0);
      }
    }
  }
  routed_affine<T>(v, br, dy, batch_stats ? x : nullptr, dx, A.data(), B.data(), D.data());
}

void check_param(const c10::optional<at::Tensor>& t, const at::Tensor& x, int64_t K, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->dim() == 2 && t->size(0) == K && t->size(1) == x.size(1), "multi_batch_norm: ",
              name, " must be [K, C] = [", K, ", ", x.size(1), "], got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), "multi_batch_norm (cpu kernel): ", name,
              " dtype ", t->scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(t->is_contiguous(), "multi_batch_norm (cpu kernel): ", name, " must be contiguous");
}

template <typename T>
T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

}  // namespace

std::vector<at::Tensor> multi_bn_forward(const at::Tensor& x_in, const at::Tensor& branch,
                                         const c10::optional<at::Tensor>& weight,
                                         const c10::optional<at::Tensor>& bias,
                                         const c10::optional<at::Tensor>& running_mean,
                                         const c10::optional<at::Tensor>& running_var,
                                         const c10::optional<at::Tensor>& num_batches_tracked,
                                         int64_t K, bool training, double momentum,
                                         bool cumulative, double eps) {
  TORCH_CHECK(x_in.dim() >= 2, "multi_batch_norm: x must be [N, C, *spatial]");
  TORCH_CHECK(branch.scalar_type() == at::kLong && branch.dim() == 1 &&
                  branch.size(0) == x_in.size(0),
              "multi_batch_norm: branch must be int64 [N]");
  check_param(weight, x_in, K, "weight");
  check_param(bias, x_in, K, "bias");
  check_param(running_mean, x_in, K, "running_mean");
  check_param(running_var, x_in, K, "running_var");
  const bool has_running = running_mean.has_value() && running_var.has_value();
  const bool batch_stats = training || !has_running;
  const bool update = training && has_running;
  if (num_batches_tracked)
    TORCH_CHECK(num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->numel() == K,
                "multi_batch_norm: num_batches_tracked must be int64 [K]");
  TORCH_CHECK(!(update && cumulative) || num_batches_tracked.has_value(),
              "multi_batch_norm: momentum=None needs num_batches_tracked");
  auto br = branch.contiguous();
  const auto counts = branch_counts(br, K);
  auto [x, v] = as_view(x_in);
  auto y = empty_like_view(x, v);
  auto mean = at::empty({K, v.C}, x.options());
  auto invstd = at::empty({K, v.C}, x.options());
  // The op is functional: updated running stats are returned as new tensors.
  at::Tensor new_rm = x.new_empty({0}), new_rv = x.new_empty({0});
  at::Tensor new_nbt = at::empty({0}, branch.options());
  if (update) {
    new_rm = running_mean->clone();
    new_rv = running_var->clone();
    if (num_batches_tracked) new_nbt = num_batches_tracked->clone();
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_bn_forward", [&] {
    scalar_t* rm = update ? new_rm.data_ptr<scalar_t>() : ptr_or_null<scalar_t>(running_mean);
    scalar_t* rv = update ? new_rv.data_ptr<scalar_t>() : ptr_or_null<scalar_t>(running_var);
    forward_impl<scalar_t>(
        v, br.data_ptr<int64_t>(), x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
        Params<scalar_t>{ptr_or_null<scalar_t>(weight), ptr_or_null<scalar_t>(bias)}, K,
        batch_stats, rm, rv, new_nbt.numel() ? new_nbt.data_ptr<int64_t>() : nullptr, update,
        momentum, cumulative, eps, counts, mean.data_ptr<scalar_t>(),
        invstd.data_ptr<scalar_t>());
  });
  return {y, mean, invstd, new_rm, new_rv, new_nbt};
}

std::vector<at::Tensor> multi_bn_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                          const at::Tensor& branch,
                                          const c10::optional<at::Tensor>& weight,
                                          const at::Tensor& mean, const at::Tensor& invstd,
                                          int64_t K, bool batch_stats, bool need_param_grads) {
  check_param(weight, x_in, K, "weight");
  auto br = branch.contiguous();
  const auto counts = branch_counts(br, K);
  auto [x, v] = as_view(x_in);
  auto dy = match_layout(dy_in, x, v);
  auto dx = empty_like_view(x, v);
  auto dweight = at::empty({need_param_grads ? K : 0, v.C}, x.options());
  auto dbias = at::empty({need_param_grads ? K : 0, v.C}, x.options());
  auto mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_bn_backward", [&] {
    backward_impl<scalar_t>(v, br.data_ptr<int64_t>(), dy.data_ptr<scalar_t>(),
                            x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                            Params<scalar_t>{ptr_or_null<scalar_t>(weight), nullptr},
                            mean_c.data_ptr<scalar_t>(), invstd_c.data_ptr<scalar_t>(), K,
                            batch_stats, need_param_grads, counts,
                            need_param_grads ? dweight.data_ptr<scalar_t>() : nullptr,
                            need_param_grads ? dbias.data_ptr<scalar_t>() : nullptr);
  });
  return {dx, dweight, dbias};
}

}  // namespace fastrobust::cpu
