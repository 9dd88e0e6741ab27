// CPU kernels of the sample-routed multi-branch batch norm (shared/DESIGN.md §2.1).
//
// Layouts served natively, as [N, C, S] with S = prod(spatial):
//   planes        x[n, c, s] at n*sN + c*S + s   (NCHW-contiguous samples; sN may be anything)
//   channels_last x[n, c, s] at n*sN + s*C + c   (NHWC-contiguous samples)
// Every tensor of a call has the same layout but its own sN (a batch slice keeps its stride);
// anything else is made contiguous once (the only copy this file makes).
//
// Each op is three stages: per-plane values (a plane is one (n, c)) from the layout-specific
// leaf loops, a per-(branch, channel) reduction of them in double, and one elementwise pass.
// Statistics: each plane's mean and M2 = Σ(x - mean)² in two passes while it sits in L1, then
// M2_kc = Σ M2_plane + S·Σ(mean_plane - μ_kc)²: no Σx² - (Σx)²/m cancellation anywhere.
#include "multi_bn.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace fastrobust::cpu {
namespace {

enum class Layout { Planes, ChannelsLast };

struct View {
  Layout layout;
  int64_t N, C, S, sN;
};

// A tensor's data and batch stride.
template <typename T>
struct Walk {
  T* p;
  int64_t sN;
  T* sample(int64_t n) const { return p + n * sN; }
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

// dy must have x's layout (its own batch stride is fine); it is copied into that layout when
// autograd hands over something else (e.g. the stride-0 gradient of y.sum()).
std::pair<at::Tensor, View> match_layout(const at::Tensor& t, const at::Tensor& like,
                                         const View& v) {
  auto [tt, tv] = as_view(t);
  if (tv.layout == v.layout) return {tt, tv};
  auto out = empty_like_view(like, v);
  out.copy_(t);
  return as_view(out);
}

template <typename T>
Walk<T> walk(const at::Tensor& t, const View& v) {
  return {t.data_ptr<std::remove_const_t<T>>(), v.sN};
}

// The innermost loops, compiled for the baseline ISA and for AVX2+FMA; `leaves<T>()` picks one
// at run time, so one binary serves any x86-64 CPU at its best speed.
namespace isa_base {
#include "multi_bn_leaf.inc"
}  // namespace isa_base
#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "multi_bn_leaf.inc"
}  // namespace isa_avx2
#pragma GCC pop_options
#define FASTROBUST_HAVE_AVX2 1
#endif

template <typename T>
struct Leaves {
  decltype(&isa_base::planes_moments<T>) planes_moments;
  decltype(&isa_base::planes_grad_sums<T>) planes_grad_sums;
  decltype(&isa_base::planes_affine<T>) planes_affine;
  decltype(&isa_base::rows_moments<T>) rows_moments;
  decltype(&isa_base::rows_grad_sums<T>) rows_grad_sums;
  decltype(&isa_base::rows_affine<T>) rows_affine;
};

#define FASTROBUST_LEAVES(ns)                                                            \
  Leaves<T> {                                                                            \
    ns::planes_moments<T>, ns::planes_grad_sums<T>, ns::planes_affine<T>,                \
        ns::rows_moments<T>, ns::rows_grad_sums<T>, ns::rows_affine<T>                   \
  }

template <typename T>
const Leaves<T>& leaves() {
#ifdef FASTROBUST_HAVE_AVX2
  static const Leaves<T> l = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
                                 ? FASTROBUST_LEAVES(isa_avx2)
                                 : FASTROBUST_LEAVES(isa_base);
#else
  static const Leaves<T> l = FASTROBUST_LEAVES(isa_base);
#endif
  return l;
}

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
  T w(int64_t i) const { return weight ? weight[i] : T(1); }
  T b(int64_t i) const { return bias ? bias[i] : T(0); }
};

// Per-plane values, [N, C]: value (n, c) at n*C + c.
template <typename T>
struct PlaneValues {
  std::vector<T> a, b;
  explicit PlaneValues(const View& v) : a(v.N * v.C), b(v.N * v.C) {}
};

// Per-plane mean and M2. Planes are visited in memory order, a sample at a time: one streaming
// pass (a channel's planes, C·S apart, would defeat the prefetchers once x leaves the cache).
template <typename T>
PlaneValues<T> plane_moments(const View& v, Walk<const T> x) {
  PlaneValues<T> pv(v);
  const auto& leaf = leaves<T>();
  const bool planes = v.layout == Layout::Planes;
  at::parallel_for(0, v.N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      T* pa = &pv.a[n * v.C];
      T* pb = &pv.b[n * v.C];
      if (planes) {
        leaf.planes_moments(x.sample(n), v.S, v.C, v.S, pa, pb);
      } else {
        leaf.rows_moments(x.sample(n), v.S, v.C, pa, pb);
      }
    }
  });
  return pv;
}

// Per-plane Σdy and Σdy·(x - μ_kc), in the same order.
template <typename T>
PlaneValues<T> plane_grad_sums(const View& v, const int64_t* br, Walk<const T> dy,
                               Walk<const T> x, const T* mean) {
  PlaneValues<T> pv(v);
  const auto& leaf = leaves<T>();
  const bool planes = v.layout == Layout::Planes;
  at::parallel_for(0, v.N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T* mu = mean + br[n] * v.C;
      T* pa = &pv.a[n * v.C];
      T* pb = &pv.b[n * v.C];
      if (planes) {
        leaf.planes_grad_sums(dy.sample(n), v.S, x.sample(n), v.S, v.C, v.S, mu, pa, pb);
      } else {
        leaf.rows_grad_sums(dy.sample(n), x.sample(n), v.S, v.C, mu, pa, pb);
      }
    }
  });
  return pv;
}

// out = A[k, c]·u + B[k, c]·v + D[k, c] with k = branch[n] (v may be null): the forward's
// y = a·x + d and the backward's dx = α·dy + β·x + γ. Work is split into runs of planes (or
// channels-last rows) of one sample, a leaf call each.
template <typename T>
void routed_affine(const View& v, const int64_t* br, Walk<const T> u, Walk<const T> w,
                   Walk<T> out, const T* A, const T* B, const T* D) {
  const auto& leaf = leaves<T>();
  const bool planes = v.layout == Layout::Planes;
  const int64_t per_sample = planes ? v.C : v.S, len = planes ? v.S : v.C;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(len, 1));
  at::parallel_for(0, v.N * per_sample, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {
      const int64_t n = i / per_sample, j = i % per_sample;
      const int64_t run = std::min(i1 - i, per_sample - j), kC = br[n] * v.C;
      const int64_t off = j * len;
      const T* wp = w.p ? w.sample(n) + off : nullptr;
      if (planes) {
        leaf.planes_affine(out.sample(n) + off, u.sample(n) + off, wp, run, v.S, A + kC + j,
                           B + kC + j, D + kC + j);
      } else {
        leaf.rows_affine(out.sample(n) + off, u.sample(n) + off, wp, run, v.C, A + kC, B + kC,
                         D + kC);
      }
      i += run;
    }
  });
}

// Forward: plane moments, merged per (branch, channel) in double; running-stat update; one
// elementwise pass.
template <typename T>
void forward_impl(const View& v, const int64_t* br, Walk<const T> x, Walk<T> y, Params<T> p,
                  int64_t K, bool batch_stats, T* rmean, T* rvar, int64_t* nbt, bool update,
                  double momentum, bool cumulative, double eps,
                  const std::vector<int64_t>& counts, T* mean_out, T* invstd_out) {
  const int64_t C = v.C, S = v.S;
  std::vector<T> A(K * C), D(K * C);
  if (batch_stats) {
    const auto pv = plane_moments(v, x);
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<double> sum(K), m2(K);
      for (int64_t c = c0; c < c1; ++c) {
        std::fill(sum.begin(), sum.end(), 0.0);
        std::fill(m2.begin(), m2.end(), 0.0);
        for (int64_t n = 0; n < v.N; ++n) sum[br[n]] += pv.a[n * C + c];
        for (int64_t k = 0; k < K; ++k) {
          const double planes = double(std::max<int64_t>(counts[k], 1));
          sum[k] /= planes;  // now the branch mean
        }
        for (int64_t n = 0; n < v.N; ++n) {
          const int64_t k = br[n], i = n * C + c;
          const double d = double(pv.a[i]) - sum[k];
          m2[k] += double(pv.b[i]) + double(S) * d * d;
        }
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = k * C + c;
          const double m = double(counts[k] * S), var = m > 0 ? m2[k] / m : 0.0;
          mean_out[i] = T(sum[k]);
          invstd_out[i] = T(1.0 / std::sqrt(var + eps));
          if (update && m >= 2) {
            const double mom = (cumulative && nbt) ? 1.0 / double(nbt[k] + 1) : momentum;
            rmean[i] = T((1 - mom) * double(rmean[i]) + mom * sum[k]);
            rvar[i] = T((1 - mom) * double(rvar[i]) + mom * var * m / (m - 1));
          }
        }
      }
    });
  } else {
    for (int64_t i = 0; i < K * C; ++i) {
      mean_out[i] = rmean[i];
      invstd_out[i] = T(1.0 / std::sqrt(double(rvar[i]) + eps));
    }
  }
  for (int64_t i = 0; i < K * C; ++i) {
    A[i] = p.w(i) * invstd_out[i];
    D[i] = p.b(i) - mean_out[i] * A[i];
  }
  routed_affine<T>(v, br, x, {nullptr, 0}, y, A.data(), A.data(), D.data());
  if (update && nbt)
    for (int64_t k = 0; k < K; ++k) nbt[k] += counts[k] * S >= 2 ? 1 : 0;
}

// Backward: per (branch, channel) Σdy and Σdy·(x - μ), then dx = α·dy + β·x + γ, which is
// w·r·(dy - Σdy/m - x̂·Σ(dy·x̂)/m) with x̂ = (x - μ)·r, m = count·S.
template <typename T>
void backward_impl(const View& v, const int64_t* br, Walk<const T> dy, Walk<const T> x,
                   Walk<T> dx, Params<T> p, const T* mean, const T* invstd, int64_t K,
                   bool batch_stats, bool need_sums, const std::vector<int64_t>& counts,
                   T* dweight, T* dbias) {
  const int64_t C = v.C, S = v.S;
  std::vector<double> s1(K * C, 0.0), s2(K * C, 0.0);
  if (batch_stats || need_sums) {
    const auto pv = plane_grad_sums(v, br, dy, x, mean);
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t n = 0; n < v.N; ++n) {
          const int64_t i = n * C + c, kc = br[n] * C + c;
          s1[kc] += pv.a[i];
          s2[kc] += pv.b[i];
        }
    });
  }
  std::vector<T> A(K * C), B(K * C), D(K * C);
  for (int64_t i = 0; i < K * C; ++i) {
    const int64_t k = i / C;
    const double r = invstd[i], w = p.w(i), m = std::max<double>(1.0, double(counts[k] * S));
    if (need_sums) {
      dweight[i] = T(s2[i] * r);
      dbias[i] = T(s1[i]);
    }
    const double beta = batch_stats ? -w * r * r * r * s2[i] / m : 0.0;
    A[i] = T(w * r);
    B[i] = T(beta);
    D[i] = batch_stats ? T(-w * r * s1[i] / m - beta * double(mean[i])) : T(0);
  }
  routed_affine<T>(v, br, dy, batch_stats ? x : Walk<const T>{nullptr, 0}, dx, A.data(),
                   B.data(), D.data());
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
  const View yv = as_view(y).second;
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
        v, br.data_ptr<int64_t>(), walk<const scalar_t>(x, v), walk<scalar_t>(y, yv),
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
  auto [dy, dyv] = match_layout(dy_in, x, v);
  auto dx = empty_like_view(x, v);
  const View dxv = as_view(dx).second;
  auto dweight = at::empty({need_param_grads ? K : 0, v.C}, x.options());
  auto dbias = at::empty({need_param_grads ? K : 0, v.C}, x.options());
  auto mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_bn_backward", [&] {
    backward_impl<scalar_t>(v, br.data_ptr<int64_t>(), walk<const scalar_t>(dy, dyv),
                            walk<const scalar_t>(x, v), walk<scalar_t>(dx, dxv),
                            Params<scalar_t>{ptr_or_null<scalar_t>(weight), nullptr},
                            mean_c.data_ptr<scalar_t>(), invstd_c.data_ptr<scalar_t>(), K,
                            batch_stats, need_param_grads, counts,
                            need_param_grads ? dweight.data_ptr<scalar_t>() : nullptr,
                            need_param_grads ? dbias.data_ptr<scalar_t>() : nullptr);
  });
  return {dx, dweight, dbias};
}

}  // namespace fastrobust::cpu
