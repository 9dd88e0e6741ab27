// The bodies of the CUDA BN family's kernels, one function per kernel, each computing one
// index of its launch: the CUDA kernels (csrc/cuda/multi_bn.cu) call them from grid-stride
// loops, and the host emulation (csrc/cpu/cuda_emulation.cpp) calls them in plain loops, so
// the CPU tests run exactly this code. Every index is independent of the others within a
// launch (no shared memory, no atomics), which is what makes the host loop faithful.
//
// T is the data type, A the accumulation type. Include inside a namespace, after
// multi_bn_cuda.h and with FASTROBUST_HD, bn_math.h's formulas and the ld/st helpers in scope.
//
// Workspace (A values, bn_workspace): parts [4, splits, N, C] (forward: plane-chunk mean, M2;
// backward: Σg, Σg·(x − ctr), Σ(x − ctr), Σ(x − ctr)²), coef [8, K, C], count [K], the
// backward's plane centres in u's units [N, C], and for a mixed backward the [N, K, C]
// mix-gradient terms.

// coef rows
constexpr int kAEff = 0;    // a for the planes (0 for a single-value branch)
constexpr int kDEff = 1;    // d for the planes (the bias for a single-value branch)
constexpr int kQ = 2;       // backward: q_k
constexpr int kR = 3;       // backward: r_k
constexpr int kT1 = 4;      // backward: Σ M·dz
constexpr int kT2 = 5;      // backward: Σ M·dz·x̂
constexpr int kVar = 6;     // backward: the branch's biased variance (mixed)
constexpr int kSingle = 7;  // 1 for a single-value branch

template <typename A>
struct Work {
  A* parts;
  A* coef;
  A* count;
  A* centre;
  A* terms;
  int64_t NC, KC, T;
  FASTROBUST_HD Work(const BnArgs& a)
      : NC(a.N * a.C), KC(a.K * a.C), T(a.splits) {
    parts = static_cast<A*>(a.work);
    coef = parts + 4 * T * NC;
    count = coef + 8 * KC;
    centre = count + a.K;
    terms = centre + NC;
  }
  FASTROBUST_HD A& part(int j, int64_t t, int64_t nc) const { return parts[(j * T + t) * NC + nc]; }
  FASTROBUST_HD A& co(int row, int64_t kc) const { return coef[row * KC + kc]; }
};

FASTROBUST_HD int64_t chunk_len(const BnArgs& a, int64_t t) {
  const int64_t s0 = t * a.chunk;
  return (s0 + a.chunk < a.S ? s0 + a.chunk : a.S) - s0;
}

template <typename T>
FASTROBUST_HD int64_t off(const int64_t* st, int64_t n, int64_t c, int64_t s) {
  return n * st[0] + c * st[1] + s * st[2];
}

// Routing weight of sample n in branch k; `bad` is set for a sample the op cannot use (branch
// id out of range; a negative mix weight where the statistics are mix-weighted): its planes
// are poisoned with NaN, since a device cannot raise without a host sync.
template <typename A>
FASTROBUST_HD A route_w(const BnArgs& a, int64_t n, int64_t k) {
  if (a.branch) return a.branch[n] == k ? A(1) : A(0);
  const A w = static_cast<const A*>(a.mix)[n * a.K + k];
  return (a.batch_stats && w < A(0)) ? A(0) : w;
}

template <typename A>
FASTROBUST_HD bool bad_sample(const BnArgs& a, int64_t n) {
  if (a.branch) return a.branch[n] < 0 || a.branch[n] >= a.K;
  if (!a.batch_stats) return false;
  const A* m = static_cast<const A*>(a.mix) + n * a.K;
  for (int64_t k = 0; k < a.K; ++k)
    if (m[k] < A(0)) return true;
  return false;
}

template <typename T, typename A>
FASTROBUST_HD A opt(const void* p, int64_t i, A dflt) {
  return p ? ld<A>(static_cast<const T*>(p), i) : dflt;
}

// A plane's mean and M2 from its chunks': the closed form of Chan's merge (one division,
// no Σx² cancellation): M2 = Σ_t M2_t + n_t·(mean_t − mean)².
template <typename A>
FASTROBUST_HD void plane_moments(const BnArgs& a, const Work<A>& w, int64_t nc, A& pm, A& pq) {
  if (a.splits == 1) {
    pm = w.part(0, 0, nc);
    pq = w.part(1, 0, nc);
    return;
  }
  A sum = 0;
  for (int64_t t = 0; t < a.splits; ++t) sum += A(chunk_len(a, t)) * w.part(0, t, nc);
  pm = sum / A(a.S);
  pq = 0;
  for (int64_t t = 0; t < a.splits; ++t)
    pq += plane_m2_share(A(1), A(1), w.part(0, t, nc), w.part(1, t, nc), pm, A(chunk_len(a, t)));
}

// Whether branch k's batch statistics come from one value (one sample routed there, 1x1
// maps): x̂ is then exactly 0, the output exactly the bias and the input gradient exactly 0.
template <typename A>
FASTROBUST_HD bool branch_single(const BnArgs& a, int64_t k) {
  if (!a.batch_stats || a.S != 1) return false;
  int64_t nnz = 0;
  for (int64_t n = 0; n < a.N; ++n)
    if (route_w<A>(a, n, k) != A(0) && ++nnz > 1) return false;
  return nnz == 1;
}

// Branch k's a, d as the planes use them, from the statistics and parameters.
template <typename A>
FASTROBUST_HD void branch_coefs(const BnArgs& a, int64_t kc, bool single, A& ae, A& de) {
  const A r = static_cast<const A*>(a.invstd)[kc], mu = static_cast<const A*>(a.mean)[kc];
  const A ca = coef_a(opt<A, A>(a.weight, kc, A(1)), r), b = opt<A, A>(a.bias, kc, A(0));
  ae = single ? A(0) : ca;
  de = single ? b : coef_d(b, mu, ca);
}

// --- forward ----------------------------------------------------------------------------------

// Index (t, n, c) of splits × N × C: the chunk's mean and M2, two passes over it (the second
// from cache), like the CPU's planes: no Σx² cancellation.
template <typename T, typename A>
FASTROBUST_HD void moments_body(const BnArgs& a, int64_t i) {
  const Work<A> w(a);
  const int64_t t = i / w.NC, nc = i - t * w.NC, n = nc / a.C, c = nc - n * a.C;
  const int64_t s0 = t * a.chunk, s1 = s0 + a.chunk < a.S ? s0 + a.chunk : a.S;
  const T* x = static_cast<const T*>(a.x);
  A sum = 0;
  for (int64_t s = s0; s < s1; ++s) sum += ld<A>(x, off<T>(a.sx, n, c, s));
  const A mean = s1 > s0 ? sum / A(s1 - s0) : A(0);
  A m2 = 0;
  for (int64_t s = s0; s < s1; ++s) {
    const A d = ld<A>(x, off<T>(a.sx, n, c, s)) - mean;
    m2 += d * d;
  }
  w.part(0, t, nc) = mean;
  w.part(1, t, nc) = m2;
}

// Index (k, c) of K × C: the branch statistics of u = s·x over the batch (or the running
// ones), the running-stats update, and the planes' coefficients a, d. For k = 0 also x's
// merged plane moments (a mixed op with batch statistics keeps them for its mix gradient).
template <typename T, typename A>
FASTROBUST_HD void stats_body(const BnArgs& a, int64_t i) {
  const Work<A> w(a);
  const int64_t k = i / a.C, c = i - k * a.C;
  A* mean_o = static_cast<A*>(a.mean);
  A* invstd_o = static_cast<A*>(a.invstd);
  A mu = 0, r = 0, nnz = 0;
  if (a.batch_stats) {
    A W = 0, sum = 0;
    for (int64_t n = 0; n < a.N; ++n) {
      const int64_t nc = n * a.C + c;
      A pm, pq;
      const A wt = route_w<A>(a, n, k);
      if (k == 0 && a.planes) {
        plane_moments(a, w, nc, pm, pq);
        static_cast<A*>(a.planes)[nc] = pm;
        static_cast<A*>(a.planes)[w.NC + nc] = pq;
      }
      if (wt == A(0)) continue;
      plane_moments(a, w, nc, pm, pq);
      W += wt;
      nnz += A(1);
      sum += wt * opt<T, A>(a.scale, nc, A(1)) * pm;
    }
    mu = W != A(0) ? sum / W : A(0);
    A m2 = 0;
    for (int64_t n = 0; n < a.N; ++n) {
      const A wt = route_w<A>(a, n, k);
      if (wt == A(0)) continue;
      const int64_t nc = n * a.C + c;
      A pm, pq;
      plane_moments(a, w, nc, pm, pq);
      m2 += plane_m2_share(wt, opt<T, A>(a.scale, nc, A(1)), pm, pq, mu, A(a.S));
    }
    const A m = W * A(a.S);
    const A var = m2 / (m != A(0) ? m : A(1));
    r = bn_invstd(var, A(a.eps));
    if (c == 0) w.count[k] = m;
    if (a.update && m >= A(2)) {
      A* rm = static_cast<A*>(a.running_mean);
      A* rv = static_cast<A*>(a.running_var);
      const A mom = (a.cumulative && a.nbt) ? A(1) / A(a.nbt[k] + 1) : A(a.momentum);
      rm[i] = running_mean_update(rm[i], mom, mu);
      rv[i] = running_var_update(rv[i], mom, var, m);
    }
  } else {
    mu = static_cast<const A*>(a.running_mean)[i];
    r = bn_invstd(static_cast<const A*>(a.running_var)[i], A(a.eps));
  }
  mean_o[i] = mu;
  invstd_o[i] = r;
  const bool single = a.batch_stats && a.S == 1 && nnz == A(1);
  branch_coefs(a, i, single, w.co(kAEff, i), w.co(kDEff, i));
  w.co(kSingle, i) = single ? A(1) : A(0);
}

// The plane's mixture Σ_k M·row[k, c] of a [K, C] coefficient row.
template <typename A>
FASTROBUST_HD A mixture(const BnArgs& a, const A* row, int64_t n, int64_t c) {
  if (a.branch) {
    const int64_t k = a.branch[n];
    return (k >= 0 && k < a.K) ? row[k * a.C + c] : A(0);
  }
  A v = 0;
  for (int64_t k = 0; k < a.K; ++k) {
    const A wt = route_w<A>(a, n, k);
    if (wt != A(0)) v += wt * row[k * a.C + c];
  }
  return v;
}

// The planes' f = A·x + D coefficients: Ap, Dp (the mixtures of a, d) and A, D. From the
// coefficient rows a launch before wrote (`rows`), or from the statistics directly (the
// backward's first launch; the single-value check costs a pass over the batch, only for 1x1
// maps with batch statistics).
template <typename T, typename A>
FASTROBUST_HD void plane_coefs(const BnArgs& a, const Work<A>& w, bool rows, int64_t n,
                               int64_t c, A& Ap, A& Dp, A& Af, A& Df) {
  const int64_t nc = n * a.C + c;
  if (rows) {
    Ap = mixture(a, &w.co(kAEff, 0), n, c);
    Dp = mixture(a, &w.co(kDEff, 0), n, c);
  } else {
    Ap = Dp = A(0);
    for (int64_t k = 0; k < a.K; ++k) {
      const A wt = a.branch ? (a.branch[n] == k ? A(1) : A(0)) : route_w<A>(a, n, k);
      if (wt == A(0)) continue;
      A ae, de;
      branch_coefs(a, k * a.C + c, branch_single<A>(a, k), ae, de);
      Ap += wt * ae;
      Dp += wt * de;
    }
  }
  const A g = opt<T, A>(a.gamma, nc, A(1));
  Af = plane_A(Ap, opt<T, A>(a.scale, nc, A(1)), g);
  Df = plane_D(Dp, g, opt<T, A>(a.beta, nc, A(0)));
}

// Elements a thread of the elementwise kernels covers.
constexpr int64_t kElems = 8;

// The elementwise launches' index space: N·C planes × ceil(S / kElems) runs, ordered so that
// neighbouring indices touch neighbouring addresses (runs along S for planes, channels for
// channels_last).
FASTROBUST_HD int64_t runs(const BnArgs& a) { return (a.S + kElems - 1) / kElems; }
FASTROBUST_HD void decode(const BnArgs& a, const int64_t* st, int64_t i, int64_t& n,
                          int64_t& c, int64_t& r) {
  const int64_t R = runs(a);
  // (two 64-bit divisions, each a subroutine on the GPU)
  if (st[1] == 1 && a.C > 1) {  // channels fastest
    const int64_t q = i / a.C, q2 = q / R;
    c = i - q * a.C;
    r = q - q2 * R;
    n = q2;
  } else {
    const int64_t q = i / R, q2 = q / a.C;
    r = i - q * R;
    c = q - q2 * a.C;
    n = q2;
  }
}

// The affine launch's index space: the runs, and at least K (for the counter).
FASTROBUST_HD int64_t affine_total(const BnArgs& a) {
  const int64_t planes = a.N * a.C * runs(a);
  return planes > a.K ? planes : a.K;
}

// Index over the runs: y = act(A·x + D); indices below K also advance num_batches_tracked
// (after every read of it, which happened in the statistics launch).
template <typename T, typename A>
FASTROBUST_HD void affine_body(const BnArgs& a, int64_t i) {
  const Work<A> w(a);
  if (a.update && a.nbt && a.batch_stats && i < a.K && w.count[i] >= A(2)) a.nbt[i] += 1;
  if (i >= a.N * a.C * runs(a)) return;
  int64_t n, c, r;
  decode(a, a.sx, i, n, c, r);
  A Ap, Dp, Af, Df;
  plane_coefs<T, A>(a, w, true, n, c, Ap, Dp, Af, Df);
  const bool bad = bad_sample<A>(a, n);
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t s1 = (r + 1) * kElems < a.S ? (r + 1) * kElems : a.S;
  for (int64_t s = r * kElems; s < s1; ++s) {
    const A v = affine_act(Af, ld<A>(x, off<T>(a.sx, n, c, s)), Df, a.relu);
    st<T>(y, off<T>(a.sy, n, c, s), bad ? A(NAN) : v);
  }
}

// --- backward ---------------------------------------------------------------------------------

// The centre of a plane's Σg·x sums, in u's units (s·ctr): its mixture of branch means.
template <typename T, typename A>
FASTROBUST_HD A centre_u(const BnArgs& a, int64_t n, int64_t c) {
  A u = mixture(a, static_cast<const A*>(a.mean), n, c);
  if (!a.branch) {
    A tot = 0;
    for (int64_t k = 0; k < a.K; ++k) tot += route_w<A>(a, n, k);
    if (tot != A(1)) u /= (tot != A(0) ? tot : A(1));
  }
  if (a.scale && ld<A>(static_cast<const T*>(a.scale), n * a.C + c) == A(0)) return A(0);
  return u;
}

// Index (t, n, c): the chunk's Σg, Σg·(x − ctr) and, for the input scale's gradient,
// Σ(x − ctr), Σ(x − ctr)² (g: dy, ReLU-masked by the recomputed pre-activation).
template <typename T, typename A>
FASTROBUST_HD void grad_sums_body(const BnArgs& a, int64_t i) {
  const Work<A> w(a);
  const int64_t t = i / w.NC, nc = i - t * w.NC, n = nc / a.C, c = nc - n * a.C;
  const int64_t s0 = t * a.chunk, s1 = s0 + a.chunk < a.S ? s0 + a.chunk : a.S;
  A Ap = 0, Dp = 0, Af = 0, Df = 0;
  if (a.relu) plane_coefs<T, A>(a, w, false, n, c, Ap, Dp, Af, Df);
  const A cu = centre_u<T, A>(a, n, c);
  if (t == 0) w.centre[nc] = cu;  // for the next two launches: no division there
  const A s_ = a.scale ? ld<A>(static_cast<const T*>(a.scale), nc) : A(1);
  const A ctr = a.scale ? (s_ != A(0) ? cu / s_ : A(0)) : cu;
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  A g1 = 0, g2 = 0, e1 = 0, e2 = 0;
  for (int64_t s = s0; s < s1; ++s) {
    const A xv = ld<A>(x, off<T>(a.sx, n, c, s));
    A g = ld<A>(dy, off<T>(a.sdy, n, c, s));
    if (a.relu) g = masked_grad(g, Af, xv, Df);
    const A d = xv - ctr;
    g1 += g;
    g2 += g * d;
    e1 += d;
    e2 += d * d;
  }
  w.part(0, t, nc) = g1;
  w.part(1, t, nc) = g2;
  w.part(2, t, nc) = e1;
  w.part(3, t, nc) = e2;
}

template <typename A>
FASTROBUST_HD A split_sum(const Work<A>& w, int j, int64_t nc) {
  A v = 0;
  for (int64_t t = 0; t < w.T; ++t) v += w.part(j, t, nc);
  return v;
}

// Index (k, c): T1 = Σ M·dz (dbias), T2 = Σ M·dz·x̂ (dweight), the dx coefficients q_k, r_k
// and, for a mixed op, the [N, K, C] terms of ∂L/∂mix.
template <typename T, typename A>
FASTROBUST_HD void grads_body(const BnArgs& a, int64_t i) {
  const Work<A> w(a);
  const int64_t k = i / a.C, c = i - k * a.C;
  const A mu = static_cast<const A*>(a.mean)[i], r = static_cast<const A*>(a.invstd)[i];
  const A ca = coef_a(opt<A, A>(a.weight, i, A(1)), r);
  const A cd = coef_d(opt<A, A>(a.bias, i, A(0)), mu, ca);
  A T1 = 0, TU = 0, W = 0, VQ = 0;
  int64_t nnz = 0;
  const bool stats_mix = a.mix && a.batch_stats;
  const A* pl = static_cast<const A*>(a.planes);
  for (int64_t n = 0; n < a.N; ++n) {
    const A wt = route_w<A>(a, n, k);
    if (wt == A(0)) continue;
    const int64_t nc = n * a.C + c;
    const A s = opt<T, A>(a.scale, nc, A(1)), g = opt<T, A>(a.gamma, nc, A(1));
    const A G1 = split_sum(w, 0, nc), G2 = split_sum(w, 1, nc);
    T1 += wt * plane_Z1(g, G1);
    TU += wt * plane_Zu(g, s, w.centre[nc], G1, G2);
    W += wt;
    ++nnz;
    if (stats_mix) VQ += plane_m2_share(wt, s, pl[nc], pl[w.NC + nc], mu, A(a.S));
  }
  const bool single = a.batch_stats && a.S == 1 && nnz == 1;
  branch_coefs(a, i, single, w.co(kAEff, i), w.co(kDEff, i));
  w.co(kSingle, i) = single ? A(1) : A(0);
  const A T2 = single ? A(0) : branch_dweight(r, TU, mu, T1);
  if (a.dweight) static_cast<A*>(a.dweight)[i] = T2;
  if (a.dbias) static_cast<A*>(a.dbias)[i] = T1;
  const A a_in = single ? A(0) : ca;
  const A m = W * A(a.S) != A(0) ? W * A(a.S) : A(1);
  w.co(kQ, i) = a.batch_stats ? branch_q(a_in, r, T2, m) : A(0);
  w.co(kR, i) = a.batch_stats ? branch_r(a_in, r, T2, mu, T1, m) : A(0);
  w.co(kT1, i) = T1;
  w.co(kT2, i) = T2;
  const A var = VQ / m;
  w.co(kVar, i) = var;
  if (!a.dmix) return;
  // ∂L/∂mix[n, k]'s share of channel c: the direct term a·Zu + d·Z1, then the path through
  // the mix-weighted statistics.
  const A inv_W = A(1) / (W != A(0) ? W : A(1)), inv_S = A(1) / (a.S ? A(a.S) : A(1));
  for (int64_t n = 0; n < a.N; ++n) {
    const int64_t nc = n * a.C + c;
    const A s = opt<T, A>(a.scale, nc, A(1)), g = opt<T, A>(a.gamma, nc, A(1));
    const A G1 = split_sum(w, 0, nc), G2 = split_sum(w, 1, nc);
    A term = ca * plane_Zu(g, s, w.centre[nc], G1, G2) + cd * plane_Z1(g, G1);
    if (a.batch_stats) {
      const A du = s * pl[nc] - mu;
      const A q = s * s * pl[w.NC + nc] * inv_S + du * du;
      term -= dmix_stats_term(ca, T1, du, r, T2, q, var, A(1)) * inv_W;  // no division here
    }
    w.terms[(n * a.K + k) * a.C + c] = term;
  }
}

// Whether the backward runs grads_body (else only dx_body, from the statistics directly).
FASTROBUST_HD bool grads_ran(const BnArgs& a) {
  return a.batch_stats || a.dweight || a.dbias || a.dmix || a.dscale || a.dgamma || a.dbeta;
}

// Index (n, k) of N × K, in the same launch as dx_body: ∂L/∂mix[n, k], summed over C.
template <typename A>
FASTROBUST_HD void dmix_body(const BnArgs& a, int64_t i) {
  const Work<A> w(a);
  A v = 0;
  for (int64_t c = 0; c < a.C; ++c) v += w.terms[i * a.C + c];
  static_cast<A*>(a.dmix)[i] = v;
}

// Index over the runs (as affine_body): dx = s·(P·g + Q·x + R); the first run of each plane
// also writes the plane's dγ, dβ and d scale.
template <typename T, typename A>
FASTROBUST_HD void dx_body(const BnArgs& a, bool needs_dx, int64_t i) {
  const Work<A> w(a);
  int64_t n, c, r;
  decode(a, a.sx, i, n, c, r);
  const int64_t nc = n * a.C + c;
  A Ap, Dp, Af, Df;
  plane_coefs<T, A>(a, w, grads_ran(a), n, c, Ap, Dp, Af, Df);
  const A s = opt<T, A>(a.scale, nc, A(1)), g = opt<T, A>(a.gamma, nc, A(1));
  const A P = Ap * g;
  const A Q = a.batch_stats ? mixture(a, &w.co(kQ, 0), n, c) * s : A(0);
  const A R = a.batch_stats ? mixture(a, &w.co(kR, 0), n, c) : A(0);
  if (needs_dx) {
    const T* x = static_cast<const T*>(a.x);
    const T* dy = static_cast<const T*>(a.dy);
    T* dx = static_cast<T*>(a.dx);
    const int64_t s1 = (r + 1) * kElems < a.S ? (r + 1) * kElems : a.S;
    for (int64_t sp = r * kElems; sp < s1; ++sp) {
      const A xv = ld<A>(x, off<T>(a.sx, n, c, sp));
      A gv = ld<A>(dy, off<T>(a.sdy, n, c, sp));
      if (a.relu) gv = masked_grad(gv, Af, xv, Df);
      st<T>(dx, off<T>(a.sdx, n, c, sp), s * bn_dxhat(P, gv, Q, xv, R));
    }
  }
  if (r == 0 && (a.dgamma || a.dbeta || a.dscale)) {
    const A G1 = split_sum(w, 0, nc), G2 = split_sum(w, 1, nc);
    const A sc = w.centre[nc], ctr = a.scale ? (s != A(0) ? sc / s : A(0)) : sc;
    if (a.dbeta) static_cast<A*>(a.dbeta)[nc] = G1;
    if (a.dgamma) static_cast<A*>(a.dgamma)[nc] = plane_dgamma(Ap, Dp, s, sc, G1, G2);
    if (a.dscale) {  // Σ_s x·(P·g + Q·x + R), from the plane's sums about the centre
      const A E1 = split_sum(w, 2, nc), E2 = split_sum(w, 3, nc), S = A(a.S);
      const A sum_gx = G2 + ctr * G1, sum_x = S * ctr + E1;
      const A sum_xx = E2 + ctr * (A(2) * E1 + S * ctr);
      static_cast<A*>(a.dscale)[nc] = P * sum_gx + Q * sum_xx + R * sum_x;
    }
  }
}
