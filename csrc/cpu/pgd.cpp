// PGD steps on the CPU: one pass over memory for the linf step, and per-sample passes for the
// l2 and MI-FGSM steps (a sample's reductions and its update run back to back on one thread,
// so the second read of the sample comes from cache). No allocation, no host round trip.
#include "pgd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace fastrobust::cpu {
namespace {

template <typename T>
struct Args {
  T* out;
  const T* xa;
  const T* g;
  const T* xn;
  const T* eps_t;  // nullptr: use eps
  const T* alpha_t;
  T eps, alpha, lo, hi;
  int64_t N, S;
  T eps_of(int64_t n) const { return eps_t ? eps_t[n] : eps; }
  T alpha_of(int64_t n) const { return alpha_t ? alpha_t[n] : alpha; }
};

// clamp(v, lo, hi) as torch.clamp computes it: max first, then min; NaN passes through.
template <typename T>
inline T clamp(T v, T lo, T hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// sign as torch.sign: -1, 0 or 1, and 0 for NaN.
template <typename T>
inline T sign(T v) {
  return static_cast<T>((v > T(0)) - (v < T(0)));
}

// The elementwise linf update of elements [i, stop) of sample n.
template <typename T, bool SIGN>
inline void linf_span(const Args<T>& a, const T* dir, int64_t n, int64_t i, int64_t stop) {
  const T e = a.eps_of(n), al = a.alpha_of(n), ne = -e, lo = a.lo, hi = a.hi;
#pragma omp simd
  for (int64_t j = i; j < stop; ++j) {
    const T d = SIGN ? sign(dir[j]) : dir[j];
    const T step = al * d;  // exact for a sign, so an FMA cannot change the sum
    const T adv = a.xa[j] + step;
    const T delta = clamp(adv - a.xn[j], ne, e);
    a.out[j] = clamp(a.xn[j] + delta, lo, hi);
  }
}

template <typename T, bool SIGN>
void linf(const Args<T>& a) {
  const int64_t numel = a.N * a.S;
  at::parallel_for(0, numel, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t n = i / a.S;
      const int64_t stop = std::min(end, (n + 1) * a.S);
      linf_span<T, SIGN>(a, a.g, n, i, stop);
      i = stop;
    }
  });
}

template <typename T>
void l2(const Args<T>& a) {
  at::parallel_for(0, a.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t o = n * a.S;
      const T* g = a.g + o;
      const T* xa = a.xa + o;
      const T* xn = a.xn + o;
      double gg = 0;
#pragma omp simd reduction(+ : gg)
      for (int64_t j = 0; j < a.S; ++j) gg += double(g[j]) * double(g[j]);
      const T s = static_cast<T>(double(a.alpha_of(n)) / std::max(std::sqrt(gg), 1e-12));
      double dd = 0;
#pragma omp simd reduction(+ : dd)
      for (int64_t j = 0; j < a.S; ++j) {
        const double d = double(xa[j] + s * g[j] - xn[j]);
        dd += d * d;
      }
      const double dn = std::sqrt(dd), e = double(a.eps_of(n));
      const T f = dn > e ? static_cast<T>(e / dn) : T(1);
      T* out = a.out + o;
      const T lo = a.lo, hi = a.hi;
#pragma omp simd
      for (int64_t j = 0; j < a.S; ++j) {
        const T delta = (xa[j] + s * g[j] - xn[j]) * f;
        out[j] = clamp(xn[j] + delta, lo, hi);
      }
    }
  });
}

template <typename T>
void mifgsm(const Args<T>& a, T* buf, T decay) {
  at::parallel_for(0, a.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t o = n * a.S;
      const T* g = a.g + o;
      double sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < a.S; ++j) sum += std::abs(double(g[j]));
      const T mean = static_cast<T>(sum / double(std::max<int64_t>(a.S, 1)));
      T* b = buf + o;
      if (mean > T(0)) {
#pragma omp simd
        for (int64_t j = 0; j < a.S; ++j) b[j] = g[j] / mean + b[j] * decay;
      } else {  // an all-zero gradient adds nothing (instead of 0/0)
#pragma omp simd
        for (int64_t j = 0; j < a.S; ++j) b[j] = T(0) + b[j] * decay;
      }
      linf_span<T, true>(a, buf, n, o, o + a.S);
    }
  });
}

void check(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastrobust (cpu): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastrobust (cpu): ", name, " is ",
              t.scalar_type(), " but x_adv is ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes() && t.strides() == ref.strides(), "fastrobust (cpu): ",
              name, " must have x_adv's shape and strides");
}

const at::Tensor* per_sample(const OptTensor& t, const at::Tensor& ref, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == ref.size(0) && t->is_contiguous() &&
                  t->scalar_type() == ref.scalar_type() && t->device().is_cpu(),
              "fastrobust (cpu): ", name, " must be a contiguous CPU [N] tensor in x's dtype");
  return &t.value();
}

template <typename T>
Args<T> make_args(at::Tensor& out, const at::Tensor& xa, const at::Tensor& g,
                  const at::Tensor& xn, const OptTensor& eps_t, double eps,
                  const OptTensor& alpha_t, double alpha, double lo, double hi) {
  check(out, xa, "out");
  check(g, xa, "grad");
  check(xn, xa, "x_nat");
  const at::Tensor* et = per_sample(eps_t, xa, "eps");
  const at::Tensor* at_ = per_sample(alpha_t, xa, "alpha");
  Args<T> a;
  a.out = out.data_ptr<T>();
  a.xa = xa.data_ptr<T>();
  a.g = g.data_ptr<T>();
  a.xn = xn.data_ptr<T>();
  a.eps_t = et ? et->data_ptr<T>() : nullptr;
  a.alpha_t = at_ ? at_->data_ptr<T>() : nullptr;
  a.eps = static_cast<T>(eps);
  a.alpha = static_cast<T>(alpha);
  a.lo = static_cast<T>(lo);
  a.hi = static_cast<T>(hi);
  a.N = xa.dim() ? xa.size(0) : 1;
  a.S = a.N ? xa.numel() / a.N : 0;
  return a;
}

}  // namespace

void pgd_update(at::Tensor& out, const at::Tensor& x_adv, const at::Tensor& grad,
                const at::Tensor& x_nat, const OptTensor& eps_t, double eps,
                const OptTensor& alpha_t, double alpha, int64_t mode, double clip_min,
                double clip_max) {
  TORCH_CHECK(mode == kLinfSign || mode == kL2 || mode == kLinfRaw,
              "fastrobust (cpu): unknown pgd mode ", mode);
  if (x_adv.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(x_adv.scalar_type(), "pgd_update", [&] {
    auto a = make_args<scalar_t>(out, x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha,
                                 clip_min, clip_max);
    if (mode == kLinfSign) linf<scalar_t, true>(a);
    else if (mode == kLinfRaw) linf<scalar_t, false>(a);
    else l2<scalar_t>(a);
  });
}

void mifgsm_update(at::Tensor& x_adv, const at::Tensor& grad, at::Tensor& buf,
                   const at::Tensor& x_nat, const OptTensor& eps_t, double eps,
                   const OptTensor& alpha_t, double alpha, double decay, double clip_min,
                   double clip_max) {
  if (x_adv.numel() == 0) return;
  check(buf, x_adv, "momentum buffer");
  AT_DISPATCH_FLOATING_TYPES(x_adv.scalar_type(), "mifgsm_update", [&] {
    auto a = make_args<scalar_t>(x_adv, x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha,
                                 clip_min, clip_max);
    mifgsm<scalar_t>(a, buf.data_ptr<scalar_t>(), static_cast<scalar_t>(decay));
  });
}

}  // namespace fastrobust::cpu
