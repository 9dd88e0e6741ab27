// The layout handling and the passes over the activation that the CPU kernels of the
// per-sample affine family share (batch_norm/cpu.cpp: routed and mixed BN; film/cpu.cpp:
// FiLM): how a tensor is walked ([N, C, S] planes or channels_last rows), the innermost loops
// compiled for the baseline ISA and for AVX2+FMA (picked at run time), and the three passes
// built on them (per-plane moments, per-plane gradient sums, the affine / backward-affine
// write).
// Internal to the CPU kernels: everything is in an anonymous namespace of each including file.
#pragma once
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>  // the non-temporal stores of planes_affine_nt (SSE2, any x86-64)
#endif

namespace fastrobust::cpu {
namespace {

using OptTensor = c10::optional<at::Tensor>;

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
  // One value per plane (1x1 maps, [N, C] inputs): a row of C values per sample is the walk
  // that vectorizes, so take it even where the planes walk is also valid.
  if (S == 1 && (C == 1 || x.stride(1) == 1)) {
    return {x, View{Layout::ChannelsLast, N, C, S, x.stride(0)}};
  }
  if ((C == 1 || x.stride(1) == S) && dense_spatial(1)) {
    return {x, View{Layout::Planes, N, C, S, x.stride(0)}};
  }
  if (x.stride(1) == 1 && dense_spatial(C)) {
    return {x, View{Layout::ChannelsLast, N, C, S, x.stride(0)}};
  }
  auto xc = x.contiguous();
  return {xc, View{Layout::Planes, N, C, S, xc.stride(0)}};
}

// Outputs of at least this many bytes are asked to live in transparent huge pages. glibc's
// malloc serves them with a fresh mmap each call (its mmap threshold stops at 32 MiB), so
// every call faults every page in: with 4 KiB pages that costs several times the pass that
// writes them (a fresh 32 MiB copy_ runs 16.5 ms against 2.0 ms into reused memory on the
// benchmark machine, 5.1 ms with huge pages).
constexpr int64_t kHugePageOutputBytes = int64_t(32) << 20;

// Outputs of this many bytes or more (y of the forward, dx of the backward, planes layout) are
// written with non-temporal stores (planes_affine_nt, planes_backward_nt). A plain store to a
// line not in the cache first reads that line from memory; an output this large would leave
// the cache before its reader comes anyway (this CPU's L3 is 32 MiB), so that read is a
// quarter of the pass's memory traffic spent for nothing. At 128 × 64 × 32 × 32 fp32 (32 MiB),
// two threads, alternating call by call with plain stores in one process: forward 6-12 %
// faster, forward+backward 10-18 %.
constexpr int64_t kStreamOutputBytes = int64_t(32) << 20;

inline bool stream_output(int64_t nbytes) { return nbytes >= kStreamOutputBytes; }

// Marks the 2 MiB-aligned interior of a fresh, not yet touched tensor MADV_HUGEPAGE (a hint:
// a kernel without transparent huge pages, or with them set to "never", ignores it).
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t nbytes = t.storage().nbytes();
  if (nbytes < kHugePageOutputBytes) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + uintptr_t(nbytes)) & ~(kHuge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

at::Tensor empty_like_view_impl(const at::Tensor& x, const View& v);

// A tensor shaped like x with the same walk (same layout, dense), huge pages asked for when
// it is large (advise_huge_pages).
at::Tensor empty_like_view(const at::Tensor& x, const View& v) {
  auto t = empty_like_view_impl(x, v);
  advise_huge_pages(t);
  return t;
}

at::Tensor empty_like_view_impl(const at::Tensor& x, const View& v) {
  // A contiguous x (also 1x1 maps walked as rows: the same memory order) gets a contiguous
  // output, so the next layer sees the memory format it gave.
  if (v.layout == Layout::ChannelsLast && x.dim() >= 3 && !x.is_contiguous()) {
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

// The backward pass's flags (see the leaf file).
struct BwdFlags {
  bool has_q, mask, dot;
};

// The innermost loops (cpu_leaf.inc) for the baseline ISA and for AVX2+FMA, picked at run
// time (csrc/cpu_isa.h).
#define FASTROBUST_ISA_LEAF "batch_norm/cpu_leaf.inc"
#include "../cpu_isa.h"

template <typename T>
struct Leaves {
  decltype(&isa_base::planes_moments<T>) planes_moments;
  decltype(&isa_base::rows_moments<T>) rows_moments;
  decltype(&isa_base::planes_grad_sums<T>) planes_grad_sums;
  decltype(&isa_base::rows_grad_sums<T>) rows_grad_sums;
  decltype(&isa_base::planes_affine<T>) planes_affine;
  decltype(&isa_base::planes_affine<T>) planes_affine_nt;
  decltype(&isa_base::rows_affine<T>) rows_affine;
  decltype(&isa_base::planes_backward<T>) planes_backward;
  decltype(&isa_base::planes_backward<T>) planes_backward_nt;
  decltype(&isa_base::rows_backward<T>) rows_backward;
  decltype(&isa_base::centre_add<T>) centre_add;
  decltype(&isa_base::shares_add<T>) shares_add;
  decltype(&isa_base::plane_z<T>) plane_z;
  decltype(&isa_base::add_scaled2) add_scaled2;
  decltype(&isa_base::plane_pqr<T>) plane_pqr;
};

#define FASTROBUST_LEAVES(ns)                                                              \
  Leaves<T> {                                                                              \
    ns::planes_moments<T>, ns::rows_moments<T>, ns::planes_grad_sums<T>,                   \
        ns::rows_grad_sums<T>, ns::planes_affine<T>, ns::planes_affine_nt<T>,             \
        ns::rows_affine<T>,                                                                \
        ns::planes_backward<T>, ns::planes_backward_nt<T>, ns::rows_backward<T>,          \
        ns::centre_add<T>,                                                                 \
        ns::shares_add<T>, ns::plane_z<T>, ns::add_scaled2, ns::plane_pqr<T>               \
  }

template <typename T>
const Leaves<T>& leaves() {
  static const Leaves<T> l = FASTROBUST_PICK_ISA(FASTROBUST_LEAVES);
  return l;
}

// --- passes over the activation -------------------------------------------------------------

// Large scratch blocks, kept by the thread that freed them for its next call. Freed to the C
// library, a block of a few hundred KB goes back to the OS (mmap, or the heap's top trimmed)
// and the next call touches fresh pages: at 128 x 512 x 4 x 4 the forward's five [N, C]
// arrays (256 KB each) took ~400 page faults a call, more time than its passes over x. A
// block is cached under its size rounded up to a power of two; a thread keeps at most kBlocks
// of them and kBytes in all (the oldest are freed first), and none over kMaxBytes (a call
// that large does enough work per page).
class ScratchCache {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 16, kMaxBytes = size_t(1) << 24,
                          kBytes = size_t(1) << 26, kBlocks = 16;

  static size_t rounded(size_t bytes) {
    size_t r = kMinBytes;
    while (r < bytes) r <<= 1;
    return r;
  }
  void* get(size_t bytes) {  // bytes: a rounded() size
    for (size_t i = n_; i-- > 0;)  // the newest first
      if (size_[i] == bytes) {
        void* p = block_[i];
        erase(i);
        return p;
      }
    return ::operator new(bytes);
  }
  void put(void* p, size_t bytes) {
    if (bytes > kMaxBytes) return ::operator delete(p);
    while (n_ > 0 && (n_ == kBlocks || total_ + bytes > kBytes)) {
      ::operator delete(block_[0]);
      erase(0);
    }
    size_[n_] = bytes;
    block_[n_++] = p;
    total_ += bytes;
  }
  ~ScratchCache() {
    for (size_t i = 0; i < n_; ++i) ::operator delete(block_[i]);
  }
  static ScratchCache& here() {
    thread_local ScratchCache cache;
    return cache;
  }

 private:
  void erase(size_t i) {  // keeps the others in age order
    total_ -= size_[i];
    for (size_t j = i + 1; j < n_; ++j) size_[j - 1] = size_[j], block_[j - 1] = block_[j];
    --n_;
  }
  size_t n_ = 0, total_ = 0, size_[kBlocks];
  void* block_[kBlocks];
};

// A std::vector whose resize leaves arithmetic values uninitialized: the per-plane scratch
// arrays ([N, C], written in full before they are read) skip a memset each. Blocks of 64 KB
// and more come from, and go back to, the thread's ScratchCache.
template <typename T>
struct NoInitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = NoInitAllocator<U>;
  };
  NoInitAllocator() = default;
  template <typename U>
  NoInitAllocator(const NoInitAllocator<U>&) noexcept {}
  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
    if (bytes < ScratchCache::kMinBytes) return std::allocator<T>::allocate(n);
    return static_cast<T*>(ScratchCache::here().get(ScratchCache::rounded(bytes)));
  }
  void deallocate(T* p, size_t n) {
    const size_t bytes = n * sizeof(T);
    if (bytes < ScratchCache::kMinBytes) return std::allocator<T>::deallocate(p, n);
    ScratchCache::here().put(p, ScratchCache::rounded(bytes));
  }
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
};
template <typename T>
using Scratch = std::vector<T, NoInitAllocator<T>>;

// fn(state, i0, i1) over [0, n) in chunks of at least `grain` indices, about kChunksPerThread
// per thread, handed out as the pool's threads ask for them (an atomic counter); state =
// init() once per thread. at::parallel_for splits the range into one equal share per thread,
// so every pass waits for its slowest thread: one that started late (woken up) or was
// preempted (a shared machine) holds up the other, for as long as the delay. Here the others
// take over its chunks. Each chunk writes only its own outputs, so the results do not depend
// on which thread ran it.
constexpr int64_t kChunksPerThread = 8;

template <typename Init, typename F>
void parallel_chunks(int64_t n, int64_t grain, const Init& init, const F& fn,
                     int64_t per_thread = kChunksPerThread) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t threads = at::get_num_threads();
  if (n < 2 * grain || threads == 1 || at::in_parallel_region()) {
    auto state = init();
    fn(state, int64_t(0), n);
    return;
  }
  const int64_t per = std::max(grain, (n + per_thread * threads - 1) / (per_thread * threads));
  const int64_t chunks = (n + per - 1) / per;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
    auto state = init();
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      fn(state, c * per, std::min(n, (c + 1) * per));
  });
}

// The same without per-thread state: fn(i0, i1).
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, const F& fn,
                     int64_t per_thread = kChunksPerThread) {
  parallel_chunks(
      n, grain, [] { return 0; }, [&](int, int64_t i0, int64_t i1) { fn(i0, i1); },
      per_thread);
}

// Planes per task of the per-plane small math (a few ns a plane): below twice this, one
// thread does it.
constexpr int64_t kGrainPlanes = 1 << 14;

// fn(i0, i1) over [0, n) in parallel, `per` planes of small math per index.
template <typename F>
void parallel_planes(int64_t n, int64_t per, const F& fn) {
  parallel_chunks(n, kGrainPlanes / std::max<int64_t>(per, 1), fn);
}

// fn(c0, c1) over blocks of channels, in parallel, each block a whole number of
// kChannelGroup-channel groups and at least grain_channels channels. The small-plane leaves
// take planes 8 at a time from the start of a run: whole groups start where a whole sample's
// run has a group start, so each plane's sums come out the same bits however the channels are
// blocked. And a group of 16 fp32 values is a cache line: blocks of different threads share
// no line of a per-channel row in T or a LineAligned row in double (rows that start on a line
// and have a multiple of 16 channels). A block walks the batch one
// sample's run of its channels at a time, the runs C·S values apart (routed_stats over x, the
// others over [N, C] rows): about two blocks per thread, so that the runs stay long enough for
// the prefetchers (routed_stats at 512 × 4×4: 8 KB).
constexpr int64_t kChannelGroup = 16;
constexpr int64_t kChannelBlocksPerThread = 2;

template <typename F>
void parallel_channels(int64_t C, int64_t grain_channels, const F& fn) {
  constexpr int64_t G = kChannelGroup;
  parallel_chunks(
      (C + G - 1) / G, (grain_channels + G - 1) / G,
      [&](int64_t g0, int64_t g1) { fn(g0 * G, std::min(C, g1 * G)); },
      kChannelBlocksPerThread);
}

// n doubles, zeroed, from a 64-byte boundary: per-channel sums that parallel_channels' tasks
// add into. Rows of a multiple of 8 channels keep every block's share on lines of its own
// (a line written by two threads in turn moves between their caches on every add).
class LineAligned {
 public:
  LineAligned(const LineAligned&) = delete;
  LineAligned& operator=(const LineAligned&) = delete;
  explicit LineAligned(size_t n) : buf_(n + 8, 0.0) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(buf_.data());
    p_ = reinterpret_cast<double*>((a + 63) & ~uintptr_t(63));
  }
  double& operator[](size_t i) { return p_[i]; }
  const double& operator[](size_t i) const { return p_[i]; }
  double* data() { return p_; }
  const double* data() const { return p_; }

 private:
  std::vector<double> buf_;
  double* p_;
};

// Per-plane [N, C] values, value (n, c) at n*C + c.
template <typename T>
struct PlaneValues {
  Scratch<T> a, b;
  explicit PlaneValues(const View& v) : a(v.N * v.C), b(v.N * v.C) {}
};

// Elements per parallel task: below that, a pass runs on the calling thread instead of paying
// a wake-up of the pool (~10 µs here) for a few microseconds of work.
constexpr int64_t kGrainElems = 1 << 15;

// Samples per task of a per-sample loop (at least kGrainElems elements).
inline int64_t sample_grain(const View& v) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(v.C * v.S, 1));
}

// Per-plane values [N, C] read a sample's row at a time: row(n) is p + n·C, or, for values that
// are the same for every sample of a branch (a routed call without per-sample extras), p + k[n]·C
// with p a [K, C] array and k[n] sample n's branch: no [N, C] array to fill and read back.
// A null p is an absent operand.
template <typename T>
struct PlaneRows {
  const T* p = nullptr;
  const int64_t* k = nullptr;
  int64_t C = 0;
  PlaneRows() = default;
  PlaneRows(const T* p_, int64_t C_, const int64_t* k_ = nullptr) : p(p_), k(k_), C(C_) {}
  const T* row(int64_t n) const { return p ? p + (k ? k[n] : n) * C : nullptr; }
  explicit operator bool() const { return p != nullptr; }
};

// Each plane's centre and its sums about it, r = Σ(x - c), q = Σ(x - c)² ([N, C] each). The
// centre is given (`given`, planes layout only: one pass over each plane, a second about its
// own mean for a plane far from the given centre) or the plane's mean as rounded. Planes are visited in memory order, a sample at a time: one streaming pass (a
// channel's planes, C·S apart, would defeat the prefetchers once x leaves the cache).
template <typename T>
struct PlaneMoments {
  Scratch<T> c, r, q;
  explicit PlaneMoments(const View& v) : c(v.N * v.C), r(v.N * v.C), q(v.N * v.C) {}
};

template <typename T>
PlaneMoments<T> plane_moments(const View& v, Walk<const T> x, const PlaneRows<T>& given) {
  PlaneMoments<T> pm(v);
  const auto& leaf = leaves<T>();
  parallel_chunks(v.N, sample_grain(v), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t o = n * v.C;
      if (v.layout == Layout::Planes)
        leaf.planes_moments(x.sample(n), v.C, v.S, given.row(n), &pm.c[o], &pm.r[o], &pm.q[o]);
      else
        leaf.rows_moments(x.sample(n), v.S, v.C, &pm.c[o], &pm.r[o], &pm.q[o]);
    }
  });
  return pm;
}

// Per-plane Σg and Σg·(x - ctr[n, c]), g = dy (ReLU-masked by ma·x + md > 0 when ma is given).
template <typename T>
PlaneValues<T> plane_grad_sums(const View& v, Walk<const T> dy, Walk<const T> x,
                               PlaneRows<T> ctr, const T* ma, const T* md) {
  PlaneValues<T> pv(v);
  const auto& leaf = leaves<T>();
  parallel_chunks(v.N, sample_grain(v), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t o = n * v.C;
      const T* a = ma ? ma + o : nullptr;
      const T* d = md ? md + o : nullptr;
      if (v.layout == Layout::Planes)
        leaf.planes_grad_sums(dy.sample(n), x.sample(n), v.C, v.S, ctr.row(n), a, d, &pv.a[o],
                              &pv.b[o]);
      else
        leaf.rows_grad_sums(dy.sample(n), x.sample(n), v.S, v.C, ctr.row(n), a, d, &pv.a[o],
                            &pv.b[o]);
    }
  });
  return pv;
}

// Splits the elementwise work into runs of planes (or channels-last rows) of one sample, a leaf
// call each: fn(state, n, first plane/row j, run length), with state = init() made once per
// parallel task (scratch rows). `whole_samples` keeps each sample in one chunk (for per-sample
// accumulators written from rows).
template <typename Init, typename F>
void for_runs(const View& v, bool whole_samples, const Init& init, const F& fn) {
  const bool planes = v.layout == Layout::Planes;
  const int64_t per_sample = planes ? v.C : v.S, len = planes ? v.S : v.C;
  if (whole_samples) {
    parallel_chunks(v.N, sample_grain(v), init, [&](auto& state, int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) fn(state, n, int64_t(0), per_sample);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(len, 1));
  parallel_chunks(v.N * per_sample, grain, init, [&](auto& state, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {
      const int64_t n = i / per_sample, j = i % per_sample;
      const int64_t run = std::min(i1 - i, per_sample - j);
      fn(state, n, j, run);
      i += run;
    }
  });
}

template <typename F>
void for_runs(const View& v, bool whole_samples, const F& fn) {
  for_runs(
      v, whole_samples, [] { return 0; },
      [&](int, int64_t n, int64_t j, int64_t run) { fn(n, j, run); });
}

// out = act(A[n,c]·x + D[n,c]).
template <typename T>
void affine_pass(const View& v, Walk<const T> x, Walk<T> out, const T* A, const T* D,
                 bool relu) {
  const auto& leaf = leaves<T>();
  for_runs(v, false, [&](int64_t n, int64_t j, int64_t run) {
    const int64_t o = n * v.C;
    if (v.layout == Layout::Planes)
      leaf.planes_affine(out.sample(n) + j * v.S, x.sample(n) + j * v.S, run, v.S, A + o + j,
                         D + o + j, relu);
    else
      leaf.rows_affine(out.sample(n) + j * v.C, x.sample(n) + j * v.C, run, v.C, A + o, D + o,
                       relu);
  });
}

// v = P·g + Q·x + R, out = Sc·v, dot[n, c] += Σ x·v (all per plane; Q, ma, dot optional).
template <typename T>
void backward_pass(const View& v, Walk<const T> dy, Walk<const T> x, Walk<T> out,
                   PlaneRows<T> P, PlaneRows<T> Q, PlaneRows<T> R, PlaneRows<T> Sc, const T* ma,
                   const T* md, T* dot) {
  const auto& leaf = leaves<T>();
  const BwdFlags f{bool(Q), ma != nullptr, dot != nullptr};
  const bool planes = v.layout == Layout::Planes;
  const auto planes_leaf = stream_output(v.N * v.C * v.S * int64_t(sizeof(T)))
                               ? leaf.planes_backward_nt
                               : leaf.planes_backward;
  for_runs(v, dot != nullptr && !planes, [&](int64_t n, int64_t j, int64_t run) {
    const int64_t o = n * v.C, jo = planes ? j : 0;
    auto at = [&](const T* p) -> const T* { return p ? p + o + jo : nullptr; };
    auto at_row = [&](const PlaneRows<T>& r) -> const T* { return r ? r.row(n) + jo : nullptr; };
    T* dp = dot ? dot + o + jo : nullptr;
    const int64_t off = j * (planes ? v.S : v.C);
    const T* xs = (f.has_q || f.mask || f.dot) ? x.sample(n) + off : nullptr;
    if (planes)
      planes_leaf(out.sample(n) + off, dy.sample(n) + off, xs, run, v.S, at_row(P), at_row(Q),
                  at_row(R), at_row(Sc), at(ma), at(md), dp, f);
    else
      leaf.rows_backward(out.sample(n) + off, dy.sample(n) + off, xs, run, v.C, at_row(P),
                         at_row(Q), at_row(R), at_row(Sc), at(ma), at(md), dp, f);
  });
}

template <typename T>
const T* ptr(const OptTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

}  // namespace
}  // namespace fastrobust::cpu
