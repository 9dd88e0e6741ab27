// The CUDA routed / mixed BN family (shared/DESIGN.md §2.1-2.4): the launchers of
// csrc/cuda/multi_bn.cu and the argument block they share with csrc/cuda/multi_bn_body.h.
// Torch-free, so the .cu compiles with nvcc alone and the same bodies run on the host
// (csrc/cpu/cuda_emulation.cpp), where the CPU tests check them against the CPU kernels.
//
// Forward, 3 launches (eval: 2): per-(split, sample, channel) moments -> per-(branch,
// channel) statistics, running stats, coefficients -> the fused apply. Backward, 3: per-split
// gradient sums -> per-(branch, channel) gradients and dx coefficients -> dx and the
// per-plane gradients. No host sync; int64 offsets throughout.
#pragma once
#include <cstdint>

#include "pgd_cuda.h"  // Dtype

namespace fastrobust::cuda {

struct BnArgs {
  // x, y, dy, dx viewed as [N, C, S], each with its own element strides {n, c, s}; data in
  // `dtype`, statistics and parameters in the accumulation type (fp64 for fp64 data, else fp32).
  const void* x = nullptr;
  void* y = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;
  int64_t N = 0, C = 0, S = 0, K = 0;
  int64_t sx[3] = {0, 0, 0}, sy[3] = {0, 0, 0}, sdy[3] = {0, 0, 0}, sdx[3] = {0, 0, 0};
  const int64_t* branch = nullptr;  // [N] (routed), or null
  const void* mix = nullptr;        // [N, K] contiguous, accumulation type (mixed), or null
  const void* weight = nullptr;     // [K, C] or null (1)
  const void* bias = nullptr;       // [K, C] or null (0)
  void* running_mean = nullptr;     // [K, C], updated in place when `update`
  void* running_var = nullptr;
  int64_t* nbt = nullptr;           // num_batches_tracked [K] or null
  const void* scale = nullptr;      // input_scale [N, C] contiguous, data dtype, or null
  const void* gamma = nullptr;      // film_gamma
  const void* beta = nullptr;       // film_beta
  void* mean = nullptr;             // [K, C]: written by the forward, read by the backward
  void* invstd = nullptr;
  void* planes = nullptr;           // [2, N, C]: x's plane mean and M2 (mixed, batch stats)
  void* work = nullptr;             // bn_workspace() accumulation-type values
  // Backward results, null where not wanted, in the accumulation type (as the CPU kernels):
  // dweight/dbias [K, C], dmix [N, K], dscale/dgamma/dbeta [N, C].
  void* dweight = nullptr;
  void* dbias = nullptr;
  void* dmix = nullptr;
  void* dscale = nullptr;
  void* dgamma = nullptr;
  void* dbeta = nullptr;
  int64_t splits = 1, chunk = 1;  // each plane's S values in `splits` chunks of `chunk`
  double momentum = 0.1, eps = 1e-5;
  bool batch_stats = true, update = false, cumulative = false, relu = false;
  Dtype dtype = Dtype::kFloat;
};

// Chunks per plane: enough blocks for a GPU when N·C is small, chunks of at least 64 values.
inline void bn_choose_splits(BnArgs& a) {
  const int64_t planes = a.N * a.C, want = 4096;
  int64_t t = (planes == 0 || planes >= want) ? 1 : (want + planes - 1) / planes;
  const int64_t max_t = a.S > 64 ? (a.S + 63) / 64 : 1;
  t = t < 1 ? 1 : (t > max_t ? max_t : t);
  a.chunk = (a.S + t - 1) / t;
  a.splits = a.chunk ? (a.S + a.chunk - 1) / a.chunk : 1;
}

// Workspace, in accumulation-type values: 4 split sums per plane, 8 [K, C] coefficient rows,
// K counts, the planes' centres [N, C], and for a mixed op the [N, K, C] mix-gradient terms.
inline int64_t bn_workspace(const BnArgs& a) {
  const int64_t NC = a.N * a.C, KC = a.K * a.C;
  return 4 * a.splits * NC + 8 * KC + a.K + NC + (a.mix ? a.N * KC : 0);
}

// Launch on `stream` (a cudaStream_t). Return null, or the CUDA error's text.
const char* bn_forward(const BnArgs& a, void* stream);
// needs_dx: write dx (dscale, dgamma, dbeta, dweight, dbias, dmix: where non-null).
const char* bn_backward(const BnArgs& a, bool needs_dx, void* stream);

}  // namespace fastrobust::cuda
