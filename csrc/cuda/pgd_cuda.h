// The CUDA PGD kernels' launchers (csrc/cuda/pgd.cu): torch-free, so the .cu compiles with
// nvcc alone. Every tensor is dense with each sample one block of S elements (x_adv's layout;
// the caller copies others), in `dtype`; eps_t / alpha_t are per-sample [N] arrays in the
// accumulation type (fp64 for fp64 data, else fp32), or null to use the scalars.
#pragma once
#include <cstdint>

namespace fastrobust::cuda {

enum class Dtype { kFloat, kDouble, kHalf, kBFloat16 };

struct PgdArgs {
  void* out;            // the result (may be x_adv)
  const void* x_adv;
  const void* grad;     // the direction (raw for the random start)
  const void* x_nat;
  void* buf;            // MI-FGSM's momentum, updated in place (else null)
  const void* eps_t;    // [N] or null
  const void* alpha_t;  // [N] or null
  void* scratch;        // [N] accumulation-type values: l2 and MI-FGSM per-sample scalars
  double eps, alpha, clip_min, clip_max, decay;
  int64_t N, S;
  int mode;             // spec.h PgdMode: 0 linf sign, 1 l2, 2 linf raw (the random start)
  Dtype dtype;
};

// Launch on `stream` (a cudaStream_t); linf: 1 kernel, l2 and MI-FGSM: 2 (per-sample sums,
// then the elementwise update). Returns null, or the CUDA error's text.
const char* pgd_update(const PgdArgs& a, void* stream);
const char* mifgsm_update(const PgdArgs& a, void* stream);

}  // namespace fastrobust::cuda
