// CPU kernels of the sample-routed multi-branch batch norm (shared/DESIGN.md §2.1).
//
// Layouts served natively, as [N, C, S] with S = prod(spatial):
//   planes        x[n, c, s] at n*sN + c*S + s   (NCHW-contiguous samples; sN may be anything)
//   channels_last x[n, c, s] at n*sN + s*C + c   (NHWC-contiguous samples)
// anything else is made contiguous once (the only copy this file makes).
//
// Statistics: every (n, c) plane is reduced in two passes while it sits in L1 (mean, then
// Σ(x-mean)²), and planes are merged into their branch with Chan's formula in double, so the
// variance never suffers the cancellation of Σx² - (Σx)²/m.
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
  decltype(&isa_base::plane_moments<T>) plane_moments;
  decltype(&isa_base::plane_grad_sums<T>) plane_grad_sums;
  decltype(&isa_base::plane_affine<T>) plane_affine;
  decltype(&isa_base::row_affine<T>) row_affine;
  decltype(&isa_base::row_add<T>) row_add;
  decltype(&isa_base::row_add_sq_dev<T>) row_add_sq_dev;
  decltype(&isa_base::row_grad_sums<T>) row_grad_sums;
};

#define FASTROBUST_LEAVES(ns)                                                             \
  Leaves<T> {                                                                             \
    ns::plane_moments<T>, ns::plane_grad_sums<T>, ns::plane_affine<T>, ns::row_affine<T>, \
        ns::row_add<T>, ns::row_add_sq_dev<T>, ns::row_grad_sums<T>                       \
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

// planes: out[n, c, :] = A[k, c]·u + B[k, c]·v + D[k, c], parallel over (n, c) planes.
template <typename T>
void planes_affine(const View& v, const int64_t* br, const T* u, const T* w, T* out,
                   const T* A, const T* B, const T* D) {
  const auto& leaf = leaves<T>();
  at::parallel_for(0, v.N * v.C, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / v.C, c = i % v.C, kc = br[n] * v.C + c;
      const int64_t off = n * v.sN + c * v.S;
      leaf.plane_affine(out + off, u + off, w ? w + off : nullptr, v.S, A[kc], B[kc], D[kc]);
    }
  });
}

// channels_last: out[n, s, :] = A[k, :]·u + B[k, :]·v + D[k, :], parallel over rows.
template <typename T>
void cl_affine(const View& v, const int64_t* br, const T* u, const T* w, T* out, const T* A,
               const T* B, const T* D) {
  const auto& leaf = leaves<T>();
  at::parallel_for(0, v.N * v.S, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / v.S, off = n * v.sN + (r % v.S) * v.C, kC = br[n] * v.C;
      leaf.row_affine(out + off, u + off, w ? w + off : nullptr, v.C, A + kC, B + kC, D + kC);
    }
  });
}

// channels_last moments: each thread owns a range of samples and keeps its own [K, C] moments,
// merged afterwards (few threads, tiny). Per sample, every channel's plane mean then M2.
template <typename T>
std::vector<Moments> cl_moments(const View& v, const int64_t* br, const T* x, int64_t K) {
  const int64_t C = v.C, S = v.S, threads = at::get_num_threads();
  const auto& leaf = leaves<T>();
  std::vector<std::vector<Moments>> local(threads, std::vector<Moments>(K * C));
  at::parallel_for(0, v.N, 1, [&](int64_t n0, int64_t n1) {
    auto& acc = local[at::get_thread_num()];
    std::vector<T> mean(C), m2(C);
    for (int64_t n = n0; n < n1; ++n) {
      const T* xn = x + n * v.sN;
      std::fill(mean.begin(), mean.end(), T(0));
      std::fill(m2.begin(), m2.end(), T(0));
      for (int64_t s = 0; s < S; ++s) leaf.row_add(mean.data(), xn + s * C, C);
      for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<T>(S);
      for (int64_t s = 0; s < S; ++s) leaf.row_add_sq_dev(m2.data(), xn + s * C, mean.data(), C);
      Moments* a = acc.data() + br[n] * C;
      for (int64_t c = 0; c < C; ++c) a[c].merge(double(S), double(mean[c]), double(m2[c]));
    }
  });
  std::vector<Moments> all(K * C);
  for (auto& l : local)
    for (int64_t i = 0; i < K * C; ++i) all[i].merge(l[i].n, l[i].mean, l[i].m2);
  return all;
}

// channels_last Σdy and Σdy·(x - μ) per (branch, channel), per-thread then merged.
template <typename T>
void cl_grad_sums(const View& v, const int64_t* br, const T* dy, const T* x, const T* mean,
                  int64_t K, std::vector<double>& sdy, std::vector<double>& sdyx) {
  const int64_t C = v.C, S = v.S, threads = at::get_num_threads();
  const auto& leaf = leaves<T>();
  std::vector<std::vector<double>> l1(threads, std::vector<double>(K * C, 0.0)), l2 = l1;
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
        leaf.row_grad_sums(s1.data(), s2.data(), dy + off, x + off, mu, C);
      }
      for (int64_t c = 0; c < C; ++c) {
        l1[t][k * C + c] += s1[c];
        l2[t][k * C + c] += s2[c];
      }
    }
  });
  sdy.assign(K * C, 0.0);
  sdyx.assign(K * C, 0.0);
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t i = 0; i < K * C; ++i) {
      sdy[i] += l1[t][i];
      sdyx[i] += l2[t][i];
    }
}

// Forward: moments per (branch, channel) (channel-parallel), then one elementwise pass
// (parallel over contiguous runs). Owning a channel from statistics to output would re-read x
// from L2, but a channel's planes sit C·S apart, a power of two at ResNet shapes, and alias in
// the caches: measured slower here at C=256, 8x8.
template <typename T>
void forward_impl(const View& v, const int64_t* br, const T* x, T* y, Params<T> p, int64_t K,
                  bool batch_stats, T* rmean, T* rvar, int64_t* nbt, bool update,
                  double momentum, bool cumulative, double eps,
                  const std::vector<int64_t>& counts, T* mean_out, T* invstd_out) {
  const int64_t C = v.C, S = v.S;
  std::vector<double> mom(K);
  std::vector<char> valid(K);
  for (int64_t k = 0; k < K; ++k) {
    valid[k] = update && counts[k] * S >= 2;
    mom[k] = (cumulative && nbt) ? 1.0 / double(nbt[k] + 1) : momentum;
  }
  // Statistics, running-stat update and y = A·x + D coefficients of one (branch, channel).
  auto finalize = [&](int64_t k, int64_t c, const Moments& m, T& A, T& D) {
    const int64_t i = k * C + c;
    if (batch_stats) {
      const double var = m.n > 0 ? m.m2 / m.n : 0.0;
      mean_out[i] = T(m.mean);
      invstd_out[i] = T(1.0 / std::sqrt(var + eps));
      if (valid[k]) {
        rmean[i] = T((1 - mom[k]) * double(rmean[i]) + mom[k] * m.mean);
        rvar[i] = T((1 - mom[k]) * double(rvar[i]) + mom[k] * var * m.n / (m.n - 1));
      }
    } else {
      mean_out[i] = rmean[i];
      invstd_out[i] = T(1.0 / std::sqrt(double(rvar[i]) + eps));
    }
    A = p.w(i) * invstd_out[i];
    D = p.b(i) - mean_out[i] * A;
  };
  std::vector<T> A(K * C), D(K * C);
  if (v.layout == Layout::Planes) {
    const auto& leaf = leaves<T>();
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<Moments> m(K);
      for (int64_t c = c0; c < c1; ++c) {
        std::fill(m.begin(), m.end(), Moments{});
        for (int64_t n = 0; batch_stats && n < v.N; ++n) {
          T mu, m2;
          leaf.plane_moments(x + n * v.sN + c * S, S, &mu, &m2);
          m[br[n]].merge(double(S), double(mu), double(m2));
        }
        for (int64_t k = 0; k < K; ++k) finalize(k, c, m[k], A[k * C + c], D[k * C + c]);
      }
    });
    planes_affine<T>(v, br, x, nullptr, y, A.data(), A.data(), D.data());
  } else {
    std::vector<Moments> m = batch_stats ? cl_moments(v, br, x, K) : std::vector<Moments>(K * C);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c) finalize(k, c, m[k * C + c], A[k * C + c], D[k * C + c]);
    cl_affine<T>(v, br, x, nullptr, y, A.data(), A.data(), D.data());
  }
  if (nbt)
    for (int64_t k = 0; k < K; ++k) nbt[k] += valid[k] ? 1 : 0;
}

// Backward: Σdy and Σdy·(x - μ) per (branch, channel), then dx = α·dy + β·x + γ, which is
// w·r·(dy - Σdy/m - x̂·Σ(dy·x̂)/m) with x̂ = (x - μ)·r. Same two passes as the forward.
template <typename T>
void backward_impl(const View& v, const int64_t* br, const T* dy, const T* x, T* dx,
                   Params<T> p, const T* mean, const T* invstd, int64_t K, bool batch_stats,
                   bool need_sums, const std::vector<int64_t>& counts, T* dweight, T* dbias) {
  const int64_t C = v.C, S = v.S;
  const bool sums = batch_stats || need_sums;
  auto coefficients = [&](int64_t k, int64_t c, double sdy, double sdyx, T& a, T& b, T& d) {
    const int64_t i = k * C + c;
    const double r = invstd[i], w = p.w(i), m = std::max<double>(1.0, double(counts[k] * S));
    if (need_sums) {
      dweight[i] = T(sdyx * r);
      dbias[i] = T(sdy);
    }
    a = T(w * r);
    const double beta = batch_stats ? -w * r * r * r * sdyx / m : 0.0;
    b = T(beta);
    d = batch_stats ? T(-w * r * sdy / m - beta * double(mean[i])) : T(0);
  };
  std::vector<double> s1(K * C, 0.0), s2(K * C, 0.0);
  if (sums && v.layout == Layout::Planes) {
    const auto& leaf = leaves<T>();
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t n = 0; n < v.N; ++n) {
          const int64_t kc = br[n] * C + c, off = n * v.sN + c * S;
          T a1, a2;
          leaf.plane_grad_sums(dy + off, x + off, S, mean[kc], &a1, &a2);
          s1[kc] += a1;
          s2[kc] += a2;
        }
      }
    });
  } else if (sums) {
    cl_grad_sums(v, br, dy, x, mean, K, s1, s2);
  }
  std::vector<T> A(K * C), B(K * C), D(K * C);
  for (int64_t i = 0; i < K * C; ++i) coefficients(i / C, i % C, s1[i], s2[i], A[i], B[i], D[i]);
  auto affine = v.layout == Layout::Planes ? planes_affine<T> : cl_affine<T>;
  affine(v, br, dy, batch_stats ? x : nullptr, dx, A.data(), B.data(), D.data());
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
