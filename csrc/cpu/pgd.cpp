// PGD steps on the CPU: one pass over memory for the linf step, and per-sample passes for the
// l2 and MI-FGSM steps (a sample's reductions and its update run back to back on one thread,
// so the second read of the sample comes from cache). No allocation, no host round trip. The
// loops themselves are in pgd_leaf.inc.
#include "pgd.h"

// No fused multiply-add contraction in this file: x + α·d rounds like eager PyTorch, so every
// backend gives the same random start and the linf step stays bitwise torchattacks' order.
#pragma GCC optimize("fp-contract=off")

#include <ATen/Parallel.h>

#include <algorithm>

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

// The innermost loops, compiled for the baseline ISA and for AVX2+FMA; `leaves<T>()` picks one
// at run time (as in multi_bn.cpp).
namespace isa_base {
#include "pgd_leaf.inc"
}  // namespace isa_base
#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "pgd_leaf.inc"
}  // namespace isa_avx2
#pragma GCC pop_options
#define FASTROBUST_PGD_AVX2 1
#endif

template <typename T>
struct Leaves {
  decltype(&isa_base::linf_span<T, true>) linf_sign;
  decltype(&isa_base::linf_span<T, false>) linf_raw;
  decltype(&isa_base::l2_sample<T>) l2;
  decltype(&isa_base::mifgsm_sample<T>) mifgsm;
};

template <typename T>
const Leaves<T>& leaves() {
#define FASTROBUST_PGD_LEAVES(ns) \
  Leaves<T> { ns::linf_span<T, true>, ns::linf_span<T, false>, ns::l2_sample<T>, ns::mifgsm_sample<T> }
#ifdef FASTROBUST_PGD_AVX2
  static const Leaves<T> l = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
                                 ? FASTROBUST_PGD_LEAVES(isa_avx2)
                                 : FASTROBUST_PGD_LEAVES(isa_base);
#else
  static const Leaves<T> l = FASTROBUST_PGD_LEAVES(isa_base);
#endif
#undef FASTROBUST_PGD_LEAVES
  return l;
}

// linf: one pass over memory, split into chunks; a chunk may span samples.
template <typename T>
void linf(const Args<T>& a, bool sign) {
  const auto leaf = sign ? leaves<T>().linf_sign : leaves<T>().linf_raw;
  const int64_t numel = a.N * a.S;
  at::parallel_for(0, numel, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t n = i / a.S;
      const int64_t stop = std::min(end, (n + 1) * a.S);
      leaf(a.out + i, a.xa + i, a.g + i, a.xn + i, stop - i, a.eps_of(n), a.alpha_of(n), a.lo,
           a.hi);
      i = stop;
    }
  });
}

// l2 and MI-FGSM: one sample per task, its reductions and update back to back.
template <typename T>
void l2(const Args<T>& a) {
  const auto leaf = leaves<T>().l2;
  at::parallel_for(0, a.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t o = n * a.S;
      leaf(a.out + o, a.xa + o, a.g + o, a.xn + o, a.S, a.eps_of(n), a.alpha_of(n), a.lo, a.hi);
    }
  });
}

template <typename T>
void mifgsm(const Args<T>& a, T* buf, T decay) {
  const auto leaf = leaves<T>().mifgsm;
  at::parallel_for(0, a.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t o = n * a.S;
      leaf(a.out + o, a.g + o, buf + o, a.xn + o, a.S, a.eps_of(n), a.alpha_of(n), decay, a.lo,
           a.hi);
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
    if (mode == kL2) {
      l2<scalar_t>(a);
    } else {
      linf<scalar_t>(a, mode == kLinfSign);
    }
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
