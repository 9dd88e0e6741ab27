// The CUDA C++ kernels behind the op schemas (csrc/ops.cpp), compiled only when torch has CUDA
// and a toolkit is present (setup.py defines FASTROBUST_WITH_CUDA). The BN family goes through
// the binding the CPU tests exercise under emulation (bn_binding.h); the PGD steps through
// pgd_cuda.h. Each runs under the tensor's device, on its current stream, with no host sync.
//
// The CUDA key's kernel is plans.cpp's (the Triton kernels, launched from C++); these are
// exposed to Python as fastrobust._C._cuda_* so that `fastrobust.backends.use("cuda")` can run
// them, until a GPU has measured both.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../spec.h"
#include "bn_binding.h"
#include "pgd_cuda.h"

namespace fastrobust::cuda {
namespace {

void* stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_bn(
    const at::Tensor& x, const OptTensor& branch, const OptTensor& mix,
    const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked,
    const OptTensor& input_scale, const OptTensor& film_gamma, const OptTensor& film_beta,
    int64_t K, bool training, double momentum, bool cumulative, double eps, bool relu) {
  check_cuda(x, "multi_batch_norm", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  void* stream = stream_of(x);
  auto out = bn_forward_with(x, branch, mix, weight, bias, running_mean, running_var,
                             num_batches_tracked, input_scale, film_gamma, film_beta, K,
                             training, momentum, cumulative, eps, relu,
                             [&](const BnArgs& a) {
                               const char* err = bn_forward(a, stream);
                               TORCH_CHECK(err == nullptr, "multi_batch_norm (CUDA): ", err);
                             });
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
multi_bn_backward(const at::Tensor& dy, const at::Tensor& x, const OptTensor& branch,
                  const OptTensor& mix, const OptTensor& weight, const OptTensor& bias,
                  const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& planes,
                  const OptTensor& input_scale, const OptTensor& film_gamma,
                  const OptTensor& film_beta, int64_t K, bool batch_stats, bool relu,
                  std::vector<bool> needs) {
  check_cuda(x, "multi_batch_norm", "x");
  TORCH_CHECK_VALUE(needs.size() == kNumBNGrads, "multi_batch_norm: needs must have ",
                    int(kNumBNGrads), " flags");
  std::array<bool, kNumBNGrads> n{};
  for (int i = 0; i < kNumBNGrads; ++i) n[i] = needs[i];
  const c10::cuda::CUDAGuard guard(x.device());
  void* stream = stream_of(x);
  auto g = bn_backward_with(dy, x, branch, mix, weight, bias, mean, invstd, planes,
                            input_scale, film_gamma, film_beta, K, batch_stats, relu, n,
                            [&](const BnArgs& a, bool needs_dx) {
                              const char* err = bn_backward(a, needs_dx, stream);
                              TORCH_CHECK(err == nullptr, "multi_batch_norm (CUDA): ", err);
                            });
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6]};
}

// The PGD kernels walk each tensor as [N, S] in one dense block: x_adv must be contiguous
// (the steps update it in place), the others are made so.
PgdArgs pgd_args(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
                 const OptTensor& eps_t, double eps, const OptTensor& alpha_t, double alpha,
                 double clip_min, double clip_max, const char* op,
                 std::vector<at::Tensor>& keep) {
  check_cuda(x_adv, op, "x_adv");
  TORCH_CHECK_VALUE(x_adv.is_contiguous(), op, ": x_adv must be contiguous on CUDA");
  const auto acc = x_adv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  PgdArgs a;
  keep.push_back(grad.to(x_adv.scalar_type()).contiguous());
  a.grad = keep.back().data_ptr();
  keep.push_back(x_nat.to(x_adv.scalar_type()).contiguous());
  a.x_nat = keep.back().data_ptr();
  a.out = x_adv.data_ptr();
  a.x_adv = x_adv.data_ptr();
  a.buf = nullptr;
  a.eps_t = a.alpha_t = nullptr;
  if (eps_t) {
    keep.push_back(eps_t->to(acc).contiguous());
    a.eps_t = keep.back().data_ptr();
  }
  if (alpha_t) {
    keep.push_back(alpha_t->to(acc).contiguous());
    a.alpha_t = keep.back().data_ptr();
  }
  a.N = x_adv.dim() ? x_adv.size(0) : 1;
  a.S = a.N ? x_adv.numel() / a.N : 0;
  keep.push_back(at::empty({2 * a.N}, x_adv.options().dtype(acc)));
  a.scratch = keep.back().data_ptr();
  a.eps = eps;
  a.alpha = alpha;
  a.clip_min = clip_min;
  a.clip_max = clip_max;
  a.decay = 0;
  a.dtype = bn_dtype(x_adv);
  return a;
}

void pgd_step(at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x_nat,
              const OptTensor& eps_t, double eps, const OptTensor& alpha_t, double alpha,
              bool l2, double clip_min, double clip_max) {
  std::vector<at::Tensor> keep;
  const c10::cuda::CUDAGuard guard(x_adv.device());
  PgdArgs a = pgd_args(x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, clip_min, clip_max,
                       "pgd_step_", keep);
  a.mode = int(l2 ? kL2 : kLinfSign);
  const char* err = pgd_update(a, stream_of(x_adv));
  TORCH_CHECK(err == nullptr, "pgd_step_ (CUDA): ", err);
}

void mifgsm_step(at::Tensor& x_adv, const at::Tensor& grad, at::Tensor& momentum,
                 const at::Tensor& x_nat, const OptTensor& eps_t, double eps,
                 const OptTensor& alpha_t, double alpha, double decay, double clip_min,
                 double clip_max) {
  std::vector<at::Tensor> keep;
  const c10::cuda::CUDAGuard guard(x_adv.device());
  PgdArgs a = pgd_args(x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, clip_min, clip_max,
                       "mifgsm_step_", keep);
  TORCH_CHECK_VALUE(momentum.is_contiguous() && momentum.sizes() == x_adv.sizes() &&
                        momentum.scalar_type() == x_adv.scalar_type(),
                    "mifgsm_step_: momentum must be contiguous, with x_adv's shape and dtype");
  a.buf = momentum.data_ptr();
  a.decay = decay;
  a.mode = int(kLinfSign);
  const char* err = mifgsm_update(a, stream_of(x_adv));
  TORCH_CHECK(err == nullptr, "mifgsm_step_ (CUDA): ", err);
}

}  // namespace

// csrc/cuda/plans.cpp: the CUDA key's kernel of every op (Triton launched from C++).
void set_plan_hook(pybind11::object fn);
std::tuple<int64_t, int64_t, int64_t, int64_t> plan_stats();
std::vector<std::string> plan_refusals();

void register_python(pybind11::module& m) {
  m.def("_set_plan_hook", &set_plan_hook);
  m.def("_plan_stats", &plan_stats);
  m.def("_plan_refusals", &plan_refusals);
  m.def("_cuda_multi_bn", &multi_bn);
  m.def("_cuda_multi_bn_backward", &multi_bn_backward);
  m.def("_cuda_pgd_step", &pgd_step);
  m.def("_cuda_mifgsm_step", &mifgsm_step);
}

}  // namespace fastrobust::cuda
