"""The jit helpers of the routed / mixed BN kernels (triton.py, sync_triton.py): routing
weights, the per-(k, c) coefficients, the fused extras, the per-plane gradient results, and
the host-side helpers their launchers share. The math is fastrobust/ops/_eager.py's.

Memory ordering: a value one helper computes and another needs is passed in registers. A
program never loads what its own threads stored (docs/backends.md, "Memory ordering";
benchmarks/memory_order_check.py checks every kernel)."""
from __future__ import annotations

import triton
import triton.language as tl

from .._common import check_branch_values, check_mix_values
from .._triton.plan import host_check
from .._triton.tiles import _safe, _sum_parts, _tile


@triton.jit
def _route(ns, ks, N, K, br_ptr, sbr, mix_ptr, smn, smk, MIXED: tl.constexpr,
           ACC: tl.constexpr):
    """Routing weights M [BLOCK_N, BLOCK_K] of samples ns and whether each sample's routing
    is valid (branch id in range; mix weights >= 0)."""
    nmask = ns < N
    kmask = ks < K
    if MIXED:
        M = tl.load(mix_ptr + ns[:, None] * smn + ks[None, :] * smk,
                    mask=nmask[:, None] & kmask[None, :], other=0.0).to(ACC)
        ok = tl.min(tl.where(kmask[None, :], M, 0.0), 1) >= 0
    else:
        b = tl.load(br_ptr + ns * sbr, mask=nmask, other=-1)
        M = ((b[:, None] == ks[None, :]) & kmask[None, :]).to(ACC)
        ok = (b >= 0) & (b < K)
    return M, ok


@triton.jit
def _to_planes(M, t):
    """Σ_k M[n,k]·t[k,c] → [BLOCK_N, BLOCK_C], exact zeros where M is zero."""
    Mb = M[:, :, None]
    return tl.sum(tl.where(Mb != 0, Mb * t[None, :, :], 0.0), 1)


@triton.jit
def _to_branches(M, t):
    """Σ_n M[n,k]·t[n,c] → [BLOCK_K, BLOCK_C], exact zeros where M is zero."""
    Mb = M[:, :, None]
    return tl.sum(tl.where(Mb != 0, Mb * t[:, None, :], 0.0), 0)


@triton.jit
def _single_branches(ks, N, K, S, br_ptr, sbr, mix_ptr, smn, smk, MIXED: tl.constexpr,
                     BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_K] bool: branches whose batch statistics come from one value (one sample with a
    non-zero weight, one value per plane): there x̂ is exactly 0."""
    nnz = tl.zeros([ks.shape[0]], ACC)
    for n0 in range(0, N, BLOCK_N):
        ns = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        M, _ = _route(ns, ks, N, K, br_ptr, sbr, mix_ptr, smn, smk, MIXED, ACC)
        nnz += tl.sum((M != 0).to(ACC), 0)
    return tl.where(S == 1, nnz == 1, False)


@triton.jit
def _coefficients(ks, cs, K, C, mean_ptr, invstd_ptr, w_ptr, b_ptr, single,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    """Per-(k, c) mean, invstd, a = w·invstd, d = b − mean·a and the values the planes use
    (a_eff = 0, d_eff = b for single-value branches: exactly the bias)."""
    kc = ks[:, None] * C + cs[None, :]
    m = (ks < K)[:, None] & (cs < C)[None, :]
    mu = tl.load(mean_ptr + kc, mask=m, other=0.0)
    r = tl.load(invstd_ptr + kc, mask=m, other=0.0)
    a, d, b = _affine_of(kc, m, mu, r, w_ptr, b_ptr, HAS_W, HAS_B, ACC)
    a_eff, d_eff = _effective(a, d, b, single)
    return mu, r, a, d, a_eff, d_eff, b


@triton.jit
def _effective(a, d, b, single):
    """a, d as the planes use them: 0 and the bias for single-value branches ([BLOCK_K])."""
    return tl.where(single[:, None], 0.0, a), tl.where(single[:, None], b, d)


@triton.jit
def _affine_of(kc, m, mu, r, w_ptr, b_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
               ACC: tl.constexpr):
    """a = w·invstd, d = b − mean·a and b per (k, c)."""
    a = r
    if HAS_W:
        a = r * tl.load(w_ptr + kc, mask=m, other=0.0).to(ACC)
    b = tl.zeros_like(a)
    if HAS_B:
        b = tl.load(b_ptr + kc, mask=m, other=0.0).to(ACC)
    return a, b - mu * a, b


@triton.jit
def _invstd(var, eps, ACC: tl.constexpr):
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(var + eps)
    else:  # IEEE-rounded, as torch.rsqrt's reference (tl.sqrt is sqrt.approx on GPU)
        return 1.0 / tl.sqrt_rn(var + eps)


@triton.jit
def _running_at(ks, cs, srk, src):
    """Offsets of the running statistics' (k, c) tile, [K, C] with strides (srk, src)."""
    return ks.to(tl.int64)[:, None] * srk + cs.to(tl.int64)[None, :] * src


@triton.jit
def _update_running(rm_ptr, rv_ptr, ks, cs, srm_k, srm_c, srv_k, srv_c, kcm, mean, var, count,
                    mom, ACC: tl.constexpr):
    """Running mean and unbiased variance of branches with at least two values (each
    [K, C] with its own strides)."""
    valid = (count >= 2)[:, None]
    pm = rm_ptr + _running_at(ks, cs, srm_k, srm_c)
    pv = rv_ptr + _running_at(ks, cs, srv_k, srv_c)
    rm = tl.load(pm, mask=kcm, other=0.0)
    rv = tl.load(pv, mask=kcm, other=0.0)
    unbiased = var * (count / tl.maximum(count - 1, 1.0))[:, None]
    new_m = (1 - mom) * rm.to(ACC) + mom * mean
    new_v = (1 - mom) * rv.to(ACC) + mom * unbiased
    tl.store(pm, new_m.to(rm_ptr.dtype.element_ty), mask=kcm & valid)
    tl.store(pv, new_v.to(rv_ptr.dtype.element_ty), mask=kcm & valid)


@triton.jit
def _extras(ns, cs, N, C, sc_ptr, g_ptr, be_ptr, SCALE: tl.constexpr, GAMMA: tl.constexpr,
            BETA: tl.constexpr, ACC: tl.constexpr):
    """Input scale, FiLM γ and β of planes (ns, cs), [BLOCK_N, BLOCK_C] (1 where absent; β 0)."""
    off = ns[:, None] * C + cs[None, :]
    m = (ns < N)[:, None] & (cs < C)[None, :]
    one = tl.full(off.shape, 1.0, ACC)
    s, g, be = one, one, one * 0.0
    if SCALE:
        s = tl.load(sc_ptr + off, mask=m, other=0.0).to(ACC)
    if GAMMA:
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(ACC)
    if BETA:
        be = tl.load(be_ptr + off, mask=m, other=0.0).to(ACC)
    return s, g, be


@triton.jit
def _centre(M, mu, s, SCALE: tl.constexpr):
    """The centre of a plane's Σg·x sums, in x's units: its mixture of branch means."""
    cu = _to_planes(M, mu) / _safe(tl.sum(M, 1))[:, None]
    if SCALE:
        cu = tl.where(s != 0, cu / _safe(s), 0.0)
    return cu


@triton.jit
def _plane_centres(ns, cs, N, C, S, x_ptr, sxn, sxc, ACC: tl.constexpr):
    """Each plane's centre, its first value x[n, c, 0] ([BLOCK_N, BLOCK_C]; 0 for planes of
    no values): the moments kernel's sums are about it."""
    m = tl.where(S > 0, (ns < N)[:, None] & (cs < C)[None, :], False)
    return tl.load(x_ptr + ns[:, None] * sxn + cs.to(tl.int64)[None, :] * sxc, mask=m,
                   other=0.0).to(ACC)


@triton.jit
def _plane_sums(ns, cs, N, C, S, T, parts_ptr, x_ptr, sxn, sxc, FROM_X: tl.constexpr,
                ACC: tl.constexpr):
    """x's per-plane sums about the plane's centre c (`_plane_centres`): (c, r, q) with
    r = Σ(x − c), q = Σ(x − c)² [BLOCK_N, BLOCK_C], the T splits' sums added (or r = q = 0
    when a plane is one value: it is its own centre)."""
    c = _plane_centres(ns, cs, N, C, S, x_ptr, sxn, sxc, ACC)
    if FROM_X:
        r = tl.zeros_like(c)
        q = tl.zeros_like(c)
    else:
        r = _sum_parts(parts_ptr, 0, ns, cs, N, C, T)
        q = _sum_parts(parts_ptr, 1, ns, cs, N, C, T)
    return c, r, q


@triton.jit
def _planes_of(planes_ptr, ns, cs, N, C):
    """The forward's per-plane mean and M2 of x ([2, N, C], a mixed op's batch statistics)."""
    m = (ns < N)[:, None] & (cs < C)[None, :]
    off = ns[:, None] * C + cs[None, :]
    return (tl.load(planes_ptr + off, mask=m, other=0.0),
            tl.load(planes_ptr + N * C + off, mask=m, other=0.0))


@triton.jit
def _qr_coefficients(T1, T2, W, S, mu, r, a_eff):
    """Q_k, R_k of dx = P·g + Q·x + R per (k, c) (before the planes' mixing) and W made safe."""
    m = _safe(W * S)[:, None]
    return -a_eff * r * T2 / m, a_eff * (r * T2 * mu - T1) / m, _safe(W)[:, None]


@triton.jit
def _plane_grads(parts_ptr, planes_ptr, br_ptr, sbr, mix_ptr, smn, smk, sc_ptr, g_ptr, be_ptr,
                 dg_ptr, dbe_ptr, ds_ptr, P_ptr, Q_ptr, R_ptr, A_ptr, D_ptr, ns, cs, ks, N, C, S,
                 T, K, T1, T2, Wk, var, mu, r, a, d, a_eff, d_eff, Qk, Rk, write,
                 MIXED: tl.constexpr, BATCH: tl.constexpr, RELU: tl.constexpr,
                 NEED_PQR: tl.constexpr, NEED_G: tl.constexpr, NEED_BE: tl.constexpr, NEED_S: tl.constexpr,
                 NEED_MIX: tl.constexpr, SCALE: tl.constexpr, GAMMA: tl.constexpr,
                 BETA: tl.constexpr, ACC: tl.constexpr):
    """The results of planes (ns, cs) from the per-(k, c) sums T1, T2 (var: the per-(k, c)
    variance, for d mix's path through the statistics): returns dx's P, Q, R, the ReLU mask's
    affine A, D ([BLOCK_N, BLOCK_C]) and d mix over these channels ([BLOCK_N, BLOCK_K]);
    stores d γ, d β and d scale where `write` (and, NEED_PQR, P, Q, R and A, D for RELU: the
    gradient kernel's pass 2 stores them as soon as they are known, which keeps its
    registers within budget)."""
    nc = ns[:, None] * C + cs[None, :]
    ncm = tl.where(write, (ns < N)[:, None] & (cs < C)[None, :], False)  # (as kcm1 above)
    M, _ = _route(ns, ks, N, K, br_ptr, sbr, mix_ptr, smn, smk, MIXED, ACC)
    s, g, be = _extras(ns, cs, N, C, sc_ptr, g_ptr, be_ptr, SCALE, GAMMA, BETA, ACC)
    ctr = _centre(M, mu, s, SCALE)
    G1 = _sum_parts(parts_ptr, 0, ns, cs, N, C, T)
    G2 = _sum_parts(parts_ptr, 1, ns, cs, N, C, T)
    Ap = _to_planes(M, a_eff)
    Dp = _to_planes(M, d_eff)
    P = Ap * g
    if BATCH:
        Q = _to_planes(M, Qk) * s
        R = _to_planes(M, Rk)
    else:
        Q = tl.zeros_like(P)
        R = tl.zeros_like(P)
    if NEED_PQR:
        tl.store(P_ptr + nc, P, mask=ncm)
        tl.store(Q_ptr + nc, Q, mask=ncm)
        tl.store(R_ptr + nc, R, mask=ncm)
        if RELU:
            tl.store(A_ptr + nc, Ap * s * g, mask=ncm)
            tl.store(D_ptr + nc, Dp * g + be, mask=ncm)
    sG2 = s * G2
    sc = s * ctr
    if NEED_BE:
        tl.store(dbe_ptr + nc, G1, mask=ncm)
    if NEED_G:
        tl.store(dg_ptr + nc, Ap * (sG2 + sc * G1) + Dp * G1, mask=ncm)
    if NEED_S:  # Σ_s x·(P·g + Q·x + R), from the plane's sums about the centre
        E1 = _sum_parts(parts_ptr, 2, ns, cs, N, C, T)
        E2 = _sum_parts(parts_ptr, 3, ns, cs, N, C, T)
        sum_gx = G2 + ctr * G1
        sum_x = S * ctr + E1
        sum_xx = E2 + ctr * (2 * E1 + S * ctr)
        tl.store(ds_ptr + nc, P * sum_gx + Q * sum_xx + R * sum_x, mask=ncm)
    dm = tl.zeros([ns.shape[0], ks.shape[0]], ACC)
    if NEED_MIX:
        Z1 = g * G1
        Zu = g * sG2 + sc * Z1
        # Σ_c dz·BN_k(u), the direct term
        dm = tl.sum(Zu[:, None, :] * a[None, :, :] + Z1[:, None, :] * d[None, :, :], 2)
        if BATCH:  # and the path through the mix-weighted statistics
            pm, pq = _planes_of(planes_ptr, ns, cs, N, C)
            du = (pm * s)[:, None, :] - mu[None, :, :]
            q = (pq * s * s)[:, None, :] / tl.maximum(S, 1) + du * du
            dm -= tl.sum((a * T1 / Wk)[None, :, :] * du
                         + (0.5 * a * r * T2 / Wk)[None, :, :] * (q - var[None, :, :]), 2)
    return P, Q, R, Ap * s * g, Dp * g + be, dm


@triton.jit
def _to_branches_q(M, uq, dev, S):
    """Σ_n M[n,k]·(uq[n,c] + S·dev[n,k,c]²) → [BLOCK_K, BLOCK_C]."""
    Mb = M[:, :, None]
    return tl.sum(tl.where(Mb != 0, Mb * (uq[:, None, :] + S * dev * dev), 0.0), 0)


@triton.jit
def _dx_tile(dy_ptr, x_ptr, out_ptr, n, cs, ss, C, S, sdn, sdc, sds, sxn, sxc, sxs, son, soc,
             sos, P, Q, R, sc, ma, md, HAS_Q: tl.constexpr, MASK: tl.constexpr,
             SCALE: tl.constexpr, ACC: tl.constexpr):
    """dx of sample n's tile (ss, cs): (P·g + Q·x + R)·scale, g = dy where the ReLU passed
    (ma·x + md > 0); the coefficients are [1, BLOCK_C] rows."""
    mask = (ss < S)[:, None] & (cs < C)[None, :]
    g = tl.load(dy_ptr + _tile(n, cs, ss, sdn, sdc, sds), mask=mask, other=0.0).to(ACC)
    if HAS_Q or MASK:
        x = tl.load(x_ptr + _tile(n, cs, ss, sxn, sxc, sxs), mask=mask, other=0.0).to(ACC)
    if MASK:
        g = tl.where(ma * x + md <= 0, 0.0, g)
    v = P * g + R
    if HAS_Q:
        v += Q * x
    if SCALE:
        v = v * sc
    tl.store(out_ptr + _tile(n, cs, ss, son, soc, sos), v.to(out_ptr.dtype.element_ty),
             mask=mask)


# --- launch helpers ------------------------------------------------------------------------------

def _stats_blocks(N: int, K: int, C: int, values: int = 1024) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_C) of the per-channel-block kernels: a [BLOCK_N, BLOCK_K,
    BLOCK_C] tile of ≤ `values` values (1024 for the statistics kernel, 512 with batch
    statistics of K ≤ 2, 256 for the gradient kernel, which holds more such tiles: larger
    ones spill on sm_90, see
    benchmarks/results/triton_aot.md); narrower channel blocks (more programs) for small C."""
    block_k = triton.next_power_of_2(max(K, 1))
    block_c = min(64, triton.next_power_of_2(max(C, 1)))
    if C <= 256:
        block_c = min(block_c, 16)
    block_c = max(1, min(block_c, values // block_k))
    block_n = max(1, min(triton.next_power_of_2(max(N, 1)), values // (block_k * block_c)))
    return block_n, block_k, block_c


def _route_args(branch, mix, x):
    if mix is not None:
        return (x, 0, mix, mix.stride(0), mix.stride(1))
    return (branch, branch.stride(0), x, 0, 0)


def _check_routing(x, branch, mix, K, batch_stats, prefix=""):
    """On CPU tensors (the interpreter) bad routing raises at once, naming the public function
    (`prefix` + multi_batch_norm / mixed_batch_norm); on a GPU the kernels poison the sample
    (no host sync)."""
    if x.device.type != "cpu":
        return
    with host_check():
        if branch is not None:
            check_branch_values(branch, K, prefix + "multi_batch_norm")
        elif batch_stats:
            check_mix_values(mix, prefix + "mixed_batch_norm")
