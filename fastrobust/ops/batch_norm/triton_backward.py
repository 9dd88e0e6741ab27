"""Triton kernels of the routed / mixed BN's backward and its launcher, multi_bn_backward (the
forward, and the overview of every kernel, in triton.py):

  _grad_sums_kernel per (split, n, c): Σg and Σg·(x − centre) (g = dy masked by the ReLU,
                    recomputed from x), and Σ(x − centre), Σ(x − centre)² for the input scale's
                    gradient
  _bn_grads_kernel  per channel block: T1 = Σ M·dz, T2 = Σ M·dz·x̂ (dbias, dweight), dγ, dβ,
                    d(input scale), per-block shares of d mix, and the per-plane P, Q, R of
                    ∂L/∂u = P·g + Q·x + R
  _dx_kernel        dx = s·(P·g + Q·x + R); sums d mix over the channel blocks

The synchronized BN's backward (sync_triton.py) runs the first two with SYNC=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import on_device
from .._triton.plan import launch
from .._triton.tiles import (_blocks, _c, _like, _ncs, _plane_split, _plane_tile, _safe,
                             _splits, _sum_parts, _tile, _tiles_grid, _tl_acc, _zero)
from .schema import backward_needs
from .triton import _warps
from .triton_parts import (_centre, _coefficients, _dx_tile, _effective, _extras, _plane_grads,
                           _planes_of, _qr_coefficients, _route, _route_args, _single_branches,
                           _stats_blocks, _to_branches, _to_branches_q, _to_planes)


@triton.jit
def _grad_sums_kernel(dy_ptr, x_ptr, parts_ptr, parts2_ptr, br_ptr, sbr, mix_ptr, smn, smk,
                      mean_ptr, invstd_ptr, w_ptr, b_ptr, sc_ptr, g_ptr, be_ptr,
                      N, C, S, CHUNK, K, c_blocks, sdn, sdc, sds, sxn, sxc, sxs,
                      MIXED: tl.constexpr, SINGLE: tl.constexpr,
                      RELU: tl.constexpr, SUMS_X: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, SCALE: tl.constexpr, GAMMA: tl.constexpr,
                      BETA: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """Per (split, n, c): Σg, Σg·(x − c) (at parts2) and (SUMS_X) Σ(x − c), Σ(x − c)²."""
    n, cs, cmask, t, T, start, end = _plane_split(c_blocks, C, S, CHUNK, BLOCK_C)
    ns = n + tl.arange(0, 1)
    ks = tl.arange(0, BLOCK_K)
    if SINGLE:
        single = _single_branches(ks, N, K, S, br_ptr, sbr, mix_ptr, smn, smk, MIXED, 16, ACC)
    else:
        single = ks < 0
    M, _ = _route(ns, ks, N, K, br_ptr, sbr, mix_ptr, smn, smk, MIXED, ACC)
    mu, _r, _a, _d, a_eff, d_eff, _b0 = _coefficients(ks, cs, K, C, mean_ptr, invstd_ptr,
                                                      w_ptr, b_ptr, single, HAS_W, HAS_B, ACC)
    s, g, be = _extras(ns, cs, N, C, sc_ptr, g_ptr, be_ptr, SCALE, GAMMA, BETA, ACC)
    ctr = tl.sum(_centre(M, mu, s, SCALE), 0)
    ma = tl.sum(_to_planes(M, a_eff) * s * g, 0)
    md = tl.sum(_to_planes(M, d_eff) * g + be, 0)
    s1 = tl.zeros([BLOCK_C], ACC)
    s2 = tl.zeros([BLOCK_C], ACC)
    e1 = tl.zeros([BLOCK_C], ACC)
    e2 = tl.zeros([BLOCK_C], ACC)
    for s0 in range(start, end, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        mask = (ss < end)[:, None] & cmask[None, :]
        gr = tl.load(dy_ptr + _tile(n, cs, ss, sdn, sdc, sds),
                     mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + _tile(n, cs, ss, sxn, sxc, sxs),
                    mask=mask, other=0.0).to(ACC)
        if RELU:
            gr = tl.where(ma[None, :] * x + md[None, :] <= 0, 0.0, gr)
        e = tl.where(mask, x - ctr[None, :], 0.0)
        s1 += tl.sum(gr, 0)
        s2 += tl.sum(gr * e, 0)
        if SUMS_X:
            e1 += tl.sum(e, 0)
            e2 += tl.sum(e * e, 0)
    NC = N * C
    off = t * NC + n * C + cs
    tl.store(parts_ptr + off, s1, mask=cmask)
    tl.store(parts2_ptr + off, s2, mask=cmask)
    if SUMS_X:
        tl.store(parts_ptr + 2 * T * NC + off, e1, mask=cmask)
        tl.store(parts_ptr + 3 * T * NC + off, e2, mask=cmask)


@triton.jit
def _bn_grads_kernel(parts_ptr, planes_ptr, br_ptr, sbr, mix_ptr, smn, smk,
                     mean_ptr, invstd_ptr, w_ptr, b_ptr, sc_ptr, g_ptr, be_ptr,
                     dw_ptr, db_ptr, dg_ptr, dbe_ptr, ds_ptr, dmix_part_ptr,
                     P_ptr, Q_ptr, R_ptr, A_ptr, D_ptr, pay_ptr, N, C, S, T, K,
                     SYNC: tl.constexpr, MIXED: tl.constexpr, BATCH: tl.constexpr,
                     RELU: tl.constexpr,
                     NEED_PQR: tl.constexpr, NEED_G: tl.constexpr, NEED_BE: tl.constexpr,
                     NEED_S: tl.constexpr, NEED_MIX: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_B: tl.constexpr, SCALE: tl.constexpr, GAMMA: tl.constexpr,
                     BETA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    cs = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.arange(0, BLOCK_K)
    cmask, kmask = cs < C, ks < K
    kc = ks[:, None] * C + cs[None, :]
    kcm = kmask[:, None] & cmask[None, :]
    no_single = ks < 0
    mu = tl.load(mean_ptr + kc, mask=kcm, other=0.0)
    # Pass 1: the per-(k, c) sums over the batch. The other coefficients are loaded after it:
    # held across the loop, ptxas spilled them on sm_90.
    T1 = tl.zeros([BLOCK_K, BLOCK_C], ACC)
    TU = tl.zeros([BLOCK_K, BLOCK_C], ACC)
    VQ = tl.zeros([BLOCK_K, BLOCK_C], ACC)
    W = tl.zeros([BLOCK_K], ACC)
    nnz = tl.zeros([BLOCK_K], ACC)
    for n0 in range(0, N, BLOCK_N):
        ns = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        M, _ = _route(ns, ks, N, K, br_ptr, sbr, mix_ptr, smn, smk, MIXED, ACC)
        s, g, _b = _extras(ns, cs, N, C, sc_ptr, g_ptr, be_ptr, SCALE, GAMMA, False, ACC)
        ctr = _centre(M, mu, s, SCALE)
        G1 = _sum_parts(parts_ptr, 0, ns, cs, N, C, T)
        G2 = _sum_parts(parts_ptr, 1, ns, cs, N, C, T)
        Z1 = g * G1
        Zu = g * (s * G2) + (s * ctr) * Z1  # Σ_s dz·u per plane
        T1 += _to_branches(M, Z1)
        TU += _to_branches(M, Zu)
        W += tl.sum(M, 0)
        nnz += tl.sum((M != 0).to(ACC), 0)
        if NEED_MIX and BATCH:
            pm, pq = _planes_of(planes_ptr, ns, cs, N, C)
            um = pm * s
            dev = um[:, None, :] - mu[None, :, :]
            VQ += _to_branches_q(M, pq * s * s, dev, S)
    var = VQ / _safe(W * S)[:, None]
    mu, r, a, d, _ae, _de, b = _coefficients(ks, cs, K, C, mean_ptr, invstd_ptr, w_ptr, b_ptr,
                                          no_single, HAS_W, HAS_B, ACC)
    single = tl.where(S == 1, nnz == 1, False) & BATCH
    T2 = tl.where(single[:, None], 0.0, r * (TU - mu * T1))
    tl.store(dw_ptr + kc, T2, mask=kcm)
    tl.store(db_ptr + kc, T1, mask=kcm)
    if SYNC:  # the synchronized BN's local pass: this rank's sums, for the all-reduce
        tl.store(pay_ptr + kc, T1, mask=kcm)
        tl.store(pay_ptr + K * C + kc, T2, mask=kcm)
    else:
        a_eff, d_eff = _effective(a, d, b, single)
        _bn_grads_pass2(parts_ptr, planes_ptr, br_ptr, sbr, mix_ptr, smn, smk, sc_ptr, g_ptr,
                        be_ptr, dg_ptr, dbe_ptr, ds_ptr, dmix_part_ptr, P_ptr, Q_ptr, R_ptr,
                        A_ptr, D_ptr, T1, T2, W, var, mu, r, a, d, a_eff, d_eff, pid, ks, cs,
                        N, C, S, T, K, MIXED, BATCH, RELU, NEED_PQR, NEED_G, NEED_BE, NEED_S,
                        NEED_MIX, SCALE, GAMMA, BETA, BLOCK_N, ACC)


@triton.jit
def _bn_grads_pass2(parts_ptr, planes_ptr, br_ptr, sbr, mix_ptr, smn, smk, sc_ptr, g_ptr,
                    be_ptr, dg_ptr, dbe_ptr, ds_ptr, dmix_part_ptr, P_ptr, Q_ptr, R_ptr, A_ptr,
                    D_ptr, T1, T2, W, var, mu, r, a, d, a_eff, d_eff, pid, ks, cs, N, C, S, T,
                    K, MIXED: tl.constexpr, BATCH: tl.constexpr, RELU: tl.constexpr,
                    NEED_PQR: tl.constexpr, NEED_G: tl.constexpr, NEED_BE: tl.constexpr,
                    NEED_S: tl.constexpr, NEED_MIX: tl.constexpr, SCALE: tl.constexpr,
                    GAMMA: tl.constexpr, BETA: tl.constexpr, BLOCK_N: tl.constexpr,
                    ACC: tl.constexpr):
    """Pass 2 of the gradient kernel: the per-plane results, BLOCK_N samples at a time."""
    kmask = ks < K
    Qk, Rk, Wk = _qr_coefficients(T1, T2, W, S, mu, r, a_eff)
    for n0 in range(0, N, BLOCK_N):
        ns = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        _p, _q, _r, _a, _d, dm = _plane_grads(
            parts_ptr, planes_ptr, br_ptr, sbr, mix_ptr, smn, smk, sc_ptr, g_ptr, be_ptr,
            dg_ptr, dbe_ptr, ds_ptr, P_ptr, Q_ptr, R_ptr, A_ptr, D_ptr, ns, cs, ks, N, C, S, T,
            K, T1, T2, Wk, var, mu, r, a, d, a_eff, d_eff, Qk, Rk, True, MIXED, BATCH, RELU,
            NEED_PQR, NEED_G, NEED_BE, NEED_S, NEED_MIX, SCALE, GAMMA, BETA, ACC)
        if NEED_MIX:
            nk = (pid.to(tl.int64) * N + ns[:, None]) * K + ks[None, :]
            tl.store(dmix_part_ptr + nk, dm, mask=(ns < N)[:, None] & kmask[None, :])


@triton.jit
def _dx_kernel(dy_ptr, x_ptr, out_ptr, p_ptr, q_ptr, r_ptr, sc_ptr, ma_ptr, md_ptr,
               dmix_part_ptr, dmix_ptr, N, C, S, K, sdn, sdc, sds, sxn, sxc, sxs, son, soc,
               sos, c_blocks, s_blocks, part_blocks,
               DX: tl.constexpr, HAS_Q: tl.constexpr, MASK: tl.constexpr, SCALE: tl.constexpr,
               DMIX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
               BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    n, cb, sb = _plane_tile(c_blocks, s_blocks)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    if DX:
        ss = sb * BLOCK_S + tl.arange(0, BLOCK_S)
        cmask = cs < C
        pc = n * C + cs
        P = tl.load(p_ptr + pc, mask=cmask, other=0.0)[None, :]
        R = tl.load(r_ptr + pc, mask=cmask, other=0.0)[None, :]
        Q, sc, ma, md = P, P, P, P  # stand-ins where the flag is off
        if HAS_Q:
            Q = tl.load(q_ptr + pc, mask=cmask, other=0.0)[None, :]
        if SCALE:
            sc = tl.load(sc_ptr + pc, mask=cmask, other=0.0).to(ACC)[None, :]
        if MASK:
            ma = tl.load(ma_ptr + pc, mask=cmask, other=0.0)[None, :]
            md = tl.load(md_ptr + pc, mask=cmask, other=0.0)[None, :]
        _dx_tile(dy_ptr, x_ptr, out_ptr, n, cs, ss, C, S, sdn, sdc, sds, sxn, sxc, sxs, son,
                 soc, sos, P, Q, R, sc, ma, md, HAS_Q, MASK, SCALE, ACC)
    if DMIX:  # one program per sample sums its d mix over the stats kernel's channel blocks
        # (after the dx tile: values held across this loop spilled on sm_80)
        if (cb == 0) & (sb == 0):
            ks = tl.arange(0, BLOCK_K)
            acc = tl.zeros([BLOCK_K], ACC)
            for j in range(0, part_blocks):
                acc += tl.load(dmix_part_ptr + (j * N + n) * K + ks, mask=ks < K, other=0.0)
            tl.store(dmix_ptr + n * K + ks, acc, mask=ks < K)


def _grad_setup(x, branch, mix, weight, bias, input_scale, film_gamma, film_beta):
    """The gradient kernels' routing arguments, flags and pointers (x for an absent one)."""
    s, g, be = _c(input_scale), _c(film_gamma), _c(film_beta)
    w, b = _c(weight), _c(bias)
    flags = dict(MIXED=mix is not None, HAS_W=w is not None, HAS_B=b is not None,
                 SCALE=s is not None, GAMMA=g is not None, BETA=be is not None)
    ptrs = (x if w is None else w, x if b is None else b, x if s is None else s,
            x if g is None else g, x if be is None else be)
    return _route_args(branch, mix, x), flags, ptrs


@torch.no_grad()
def multi_bn_backward(dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale,
                      film_gamma, film_beta, num_branches, batch_stats, relu, needs):
    """fastrobust::multi_bn_backward: (dx, dmix, dweight, dbias, dscale, dgamma, dbeta), an
    unneeded one empty. (The synchronized BN's backward is sync_triton.py's, on the same two
    first kernels.)"""
    need_x, need_mix, need_w, need_b, need_s, need_g, need_be = backward_needs(
        needs, mix, input_scale, film_gamma, film_beta)
    K, C = mean.shape
    acc = mean.dtype
    ACC = _tl_acc(acc)
    dev = x.device
    x3, dy3 = _ncs(x), _ncs(dy)
    N, S = x3.shape[0], x3.shape[2]

    def empty():  # a fresh one each time: the op's outputs must not alias each other
        return x.new_empty(0, dtype=acc)

    dweight = torch.empty(K, C, device=dev, dtype=acc)
    dbias = torch.empty(K, C, device=dev, dtype=acc)
    nc = (N, C)
    dgamma = torch.empty(nc, device=dev, dtype=acc) if need_g else empty()
    dbeta = torch.empty(nc, device=dev, dtype=acc) if need_be else empty()
    dscale = torch.empty(nc, device=dev, dtype=acc) if need_s else empty()
    dmix = torch.empty(N, K, device=dev, dtype=acc) if need_mix else empty()
    dx = _like(x) if need_x else x.new_empty(0)
    if N * C * S == 0:
        with on_device(x):
            _zero(dweight, dbias, dgamma, dbeta, dscale, dmix)
        return (dx, dmix, dweight if need_w else empty(), dbias if need_b else empty(),
                dscale, dgamma, dbeta)
    route, flags, ptrs = _grad_setup(x, branch, mix, weight, bias, input_scale, film_gamma,
                                     film_beta)
    s = _c(input_scale)
    block_n, block_k, stats_c = _stats_blocks(N, K, C, values=256)
    stats_blocks = triton.cdiv(C, stats_c)
    need_pqr = need_x
    P = torch.empty(nc if need_pqr else (0,), device=dev, dtype=acc)
    Q = torch.empty(nc if need_pqr else (0,), device=dev, dtype=acc)
    R = torch.empty(nc if need_pqr else (0,), device=dev, dtype=acc)
    A = torch.empty(nc if need_pqr and relu else (0,), device=dev, dtype=acc)
    D = torch.empty(nc if need_pqr and relu else (0,), device=dev, dtype=acc)
    dmix_part = torch.empty((stats_blocks, N, K) if need_mix else (0,), device=dev, dtype=acc)
    with on_device(x):
        block_c, block_s = _blocks(x3, True)
        c_blocks = triton.cdiv(C, block_c)
        T, chunk = _splits(N, c_blocks, S, block_s)
        parts = torch.empty(4 if need_s else 2, T, N, C, device=dev, dtype=acc)
        launch(_grad_sums_kernel, (N * c_blocks, T), dy3, x3, parts, parts[1], *route, mean,
               invstd, *ptrs, N, C, S, chunk, K, c_blocks, *dy3.stride(), *x3.stride(),
               SINGLE=batch_stats and S == 1, RELU=relu, SUMS_X=need_s,
               BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_S=block_s, ACC=ACC, **flags)
        launch(_bn_grads_kernel, (stats_blocks,), parts, planes if planes.numel() else x, *route,
               mean, invstd, *ptrs, dweight, dbias, dgamma, dbeta, dscale, dmix_part, P, Q, R, A,
               D, x, N, C, S, T, K, SYNC=False, BATCH=batch_stats, BLOCK_N=block_n,
               BLOCK_K=block_k, BLOCK_C=stats_c, ACC=ACC, RELU=relu, NEED_PQR=need_pqr,
               NEED_G=need_g, NEED_BE=need_be, NEED_S=need_s, NEED_MIX=need_mix,
               num_warps=_warps(block_k), **flags)
        block_c, block_s = _blocks(x3, False)
        c_blocks = triton.cdiv(C, block_c)
        dx3 = _ncs(dx) if need_x else dy3
        s_blocks = triton.cdiv(S, block_s) if need_x else 1
        grid = _tiles_grid(N, c_blocks, s_blocks)
        if need_x or need_mix:
            launch(_dx_kernel, grid, dy3, x3, dx3, P, Q, R, x if s is None else s, A, D, dmix_part,
                   dmix, N, C, S, K, *dy3.stride(), *x3.stride(), *dx3.stride(), c_blocks,
                   s_blocks, stats_blocks, DX=need_x, HAS_Q=batch_stats, MASK=relu,
                   SCALE=s is not None, DMIX=need_mix, BLOCK_K=block_k, BLOCK_C=block_c,
                   BLOCK_S=block_s, ACC=ACC)
    return (dx, dmix, dweight if need_w else empty(), dbias if need_b else empty(), dscale,
            dgamma, dbeta)
