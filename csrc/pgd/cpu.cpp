// PGD steps on the CPU: one pass over memory for the linf step, and per-sample passes for the
// l2 and MI-FGSM steps (a sample's reductions and its update run back to back on one thread,
// so the second read of the sample comes from cache). No allocation, no host round trip. The
// loops themselves are in cpu_leaf.inc; the ops' CPU kernels (pgd_step, pgd_init,
// mifgsm_step, registered here) bring each tensor to the layout they read.
#include "cpu.h"

// No fused multiply-add contraction in this file: x + α·d rounds like eager PyTorch, so every
// backend gives the same random start and the linf step stays bitwise torchattacks' order.
#pragma GCC optimize("fp-contract=off")

#include <ATen/Parallel.h>

#include "checks.h"

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

// The innermost loops (cpu_leaf.inc) for the baseline ISA and for AVX2+FMA, picked at run
// time (csrc/cpu_isa.h).
#define FASTROBUST_ISA_LEAF "pgd/cpu_leaf.inc"
#include "../cpu_isa.h"

template <typename T>
struct Leaves {
  decltype(&isa_base::linf_span<T, true>) linf_sign;
  decltype(&isa_base::linf_span<T, false>) linf_raw;
  decltype(&isa_base::l2_sample<T>) l2;
  decltype(&isa_base::mifgsm_sample<T>) mifgsm;
};

template <typename T>
const Leaves<T>& leaves() {
#define FASTROBUST_PGD_LEAVES(ns)                                                          \
  Leaves<T> {                                                                              \
    ns::linf_span<T, true>, ns::linf_span<T, false>, ns::l2_sample<T>, ns::mifgsm_sample<T> \
  }
  static const Leaves<T> l = FASTROBUST_PICK_ISA(FASTROBUST_PGD_LEAVES);
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

// --- the ops' CPU kernels: each tensor walked as a flat [N, S] array in x_adv's layout -----

namespace {

// Dense, with each sample one block of memory (contiguous, channels_last, ...).
bool flat_layout(const at::Tensor& t) {
  if (t.numel() == 0 || t.dim() == 0) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the non-unit dims
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return t.size(0) == 1 || t.stride(0) == t.numel() / t.size(0);
}

// t in ref's layout: t itself when the strides agree, else a copy.
at::Tensor like(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides()) return t;
  return at::empty_like(ref).copy_(t);
}

at::Tensor work_of(const at::Tensor& t) { return flat_layout(t) ? t : t.contiguous(); }

// A per-sample eps / alpha / radius as the kernels read it: contiguous, in the working dtype
// (any floating dtype is accepted; float16 / bfloat16 steps work in float32).
OptTensor per_sample_in(const OptTensor& t, at::ScalarType dt) {
  if (!t) return t;
  return (t->scalar_type() == dt && t->is_contiguous()) ? t : OptTensor(t->to(dt).contiguous());
}

// float16 / bfloat16 steps run in float32 copies (eps_t, alpha_t and radius come in the
// accumulation dtype already).
bool half(const at::Tensor& t) {
  return t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble;
}

void pgd_step(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
              const OptTensor& eps_t, double eps, const OptTensor& alpha_t, double alpha,
              bool l2, double clip_min, double clip_max) {
  checks::pgd_step(x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, clip_min, clip_max);
  if (half(x_adv)) {
    const auto w = x_adv.to(at::kFloat);
    pgd_step(w, grad.to(at::kFloat), x_nat.to(at::kFloat), eps_t, eps, alpha_t, alpha, l2,
             clip_min, clip_max);
    x_adv.copy_(w);
    return;
  }
  at::Tensor work = work_of(x_adv);
  const auto dt = x_adv.scalar_type();
  pgd_update(work, work, like(grad, work), like(x_nat, work), per_sample_in(eps_t, dt), eps,
             per_sample_in(alpha_t, dt), alpha, l2 ? kL2 : kLinfSign, clip_min, clip_max);
  if (!work.is_same(x_adv)) x_adv.copy_(work);
}

void pgd_init(const at::Tensor& noise, const at::Tensor& x_nat, const OptTensor& eps_t,
              double eps, const OptTensor& radius, bool l2, double clip_min, double clip_max) {
  checks::pgd_init(noise, x_nat, eps_t, eps, radius, l2, clip_min, clip_max);
  if (half(noise)) {
    const auto w = noise.to(at::kFloat);
    pgd_init(w, x_nat.to(at::kFloat), eps_t, eps, radius, l2, clip_min, clip_max);
    noise.copy_(w);
    return;
  }
  at::Tensor work = work_of(noise);
  const at::Tensor xn = like(x_nat, work);
  const auto dt = noise.scalar_type();
  const OptTensor e = per_sample_in(eps_t, dt);
  if (l2)
    pgd_update(work, xn, work, xn, e, eps, per_sample_in(radius, dt), 0.0, kL2, clip_min,
               clip_max);
  else
    pgd_update(work, xn, work, xn, e, eps, e, eps, kLinfRaw, clip_min, clip_max);
  if (!work.is_same(noise)) noise.copy_(work);
}

void mifgsm_step(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& momentum,
                 const at::Tensor& x_nat, const OptTensor& eps_t, double eps,
                 const OptTensor& alpha_t, double alpha, double decay, double clip_min,
                 double clip_max) {
  checks::mifgsm_step(x_adv, grad, momentum, x_nat, eps_t, eps, alpha_t, alpha, decay, clip_min,
                      clip_max);
  if (half(x_adv)) {
    const auto w = x_adv.to(at::kFloat), m = momentum.to(at::kFloat);
    mifgsm_step(w, grad.to(at::kFloat), m, x_nat.to(at::kFloat), eps_t, eps, alpha_t, alpha,
                decay, clip_min, clip_max);
    x_adv.copy_(w);
    momentum.copy_(m);
    return;
  }
  at::Tensor work = work_of(x_adv);
  at::Tensor buf = like(momentum, work);
  const auto dt = x_adv.scalar_type();
  mifgsm_update(work, like(grad, work), buf, like(x_nat, work), per_sample_in(eps_t, dt), eps,
                per_sample_in(alpha_t, dt), alpha, decay, clip_min, clip_max);
  if (!work.is_same(x_adv)) x_adv.copy_(work);
  if (!buf.is_same(momentum)) momentum.copy_(buf);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrobust, CPU, m) {
  m.impl("pgd_step", &pgd_step);
  m.impl("pgd_init", &pgd_init);
  m.impl("mifgsm_step", &mifgsm_step);
}

}  // namespace fastrobust::cpu
