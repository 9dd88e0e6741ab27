"""Triton kernels of the synchronized routed / mixed BN (fastrobust.distributed): the BN's own
statistics and gradient kernels run their local pass (this rank's sums), one all-reduce sums
them over the ranks (forward: gathers each rank's sums, merged exactly here; sums Σu,
Σu² would cancel when |mean| ≫ std), and one kernel here finishes each direction:

  forward   multi_bn._moments_kernel → multi_bn._bn_stats_kernel (SYNC=1: this rank's fp64
            sums [count K | centre K·C | Σ(u − centre) K·C | Σ(u − centre)² K·C], its row
            of a [world, ...] payload) → all-reduce (the rows gathered) →
            _sync_apply_kernel (the exact merge to the
            global statistics, running statistics, coefficients and y in one pass)
  backward  multi_bn._grad_sums_kernel → multi_bn._bn_grads_kernel (SYNC=1: this rank's T1,
            T2) → all-reduce → _sync_dx_kernel (each plane's results from the global sums,
            and dx; launched by multi_bn.bn_backward)

Three launches and one collective each way; nothing on the host reads a value."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_device
from ._plan import fp32_parts, launch
from ._bn_parts import (_affine_of, _check_routing, _coefficients, _dx_tile, _extras,
                        _invstd, _plane_grads, _qr_coefficients, _route, _route_args,
                        _to_planes, _update_running)
from ._common import _blocks, _c, _ncs, _plane_tile, _scalar, _tile, _tiles_grid, _tl_acc
from .multi_bn import _forward_outputs, _running_strides, _stats, _written_running


@triton.jit
def _global_stats(pay_ptr, ks, kc, kcm, K, C, RANKS, ACC: tl.constexpr):
    """Per-(k, c) count, mean and biased variance from the all-reduced fp64 payload, one row
    per rank [count K | centre K·C | R K·C | Q K·C] (R, Q: the rank's Σ(u − centre),
    Σ(u − centre)²). An exact merge (Chan's, cross terms included; fastrobust/distributed.py
    `merge_ranks` is its PyTorch twin): the ranks' sums are moved to one centre C0, the centre
    of the first rank with values of branch k, d = C_r − C0, R = Σ R_r + n_r·d,
    Q = Σ Q_r + 2·d·R_r + n_r·d², mean = C0 + R/n, M2 = Q − R²/n. Any centre is exact here;
    a rank's centre is near its mean, so R stays small against n·std. C0 is read again where
    it is used rather than held across the loop (fewer live fp64 values: no spills)."""
    P = K + 3 * K * C
    kmask = ks < K
    n = tl.zeros([ks.shape[0]], tl.float64)
    first = tl.zeros([ks.shape[0]], tl.int32)
    for r in range(0, RANKS):
        cnt = tl.load(pay_ptr + r * P + ks, mask=kmask, other=0.0)
        first = tl.where(n == 0, r, first)
        n += cnt
    c0_ptr = pay_ptr + first[:, None] * P + K + kc
    R = tl.zeros(kc.shape, tl.float64)
    Q = tl.zeros(kc.shape, tl.float64)
    for r in range(0, RANKS):
        row = pay_ptr + r * P
        cnt = tl.load(row + ks, mask=kmask, other=0.0)[:, None]
        d = tl.load(row + K + kc, mask=kcm, other=0.0) - tl.load(c0_ptr, mask=kcm, other=0.0)
        d = tl.where(cnt != 0, d, 0.0)
        Rr = tl.load(row + K + K * C + kc, mask=kcm, other=0.0)
        R += Rr + cnt * d
        Q += tl.load(row + K + 2 * K * C + kc, mask=kcm, other=0.0) + (2 * Rr + cnt * d) * d
    nz = tl.where(n != 0, n, 1.0)[:, None]
    mean = tl.load(c0_ptr, mask=kcm, other=0.0) + R / nz
    var = tl.maximum((Q - R * R / nz) / nz, 0.0)
    return n.to(ACC), mean.to(ACC), var.to(ACC)


@triton.jit
def _sync_apply_kernel(x_ptr, out_ptr, pay_ptr, br_ptr, sbr, mix_ptr, smn, smk, sc_ptr, g_ptr,
                       be_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, srm_k, srm_c, srv_k, srv_c,
                       nbt_ptr, old_ptr, mean_ptr,
                       invstd_ptr, N, C, S, K, sxn, sxc, sxs, son, soc, sos, c_blocks,
                       s_blocks, momentum, momentum_m, momentum_l, eps, eps_m, eps_l, RANKS,
                       MIXED: tl.constexpr, RUNNING: tl.constexpr,
                       CUMULATIVE: tl.constexpr, COUNT: tl.constexpr, CHECK: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, SCALE: tl.constexpr,
                       GAMMA: tl.constexpr, BETA: tl.constexpr, RELU: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                       ACC: tl.constexpr):
    """The synchronized BN after its all-reduce, in one pass: every program derives the
    global per-(k, c) statistics of its channels from the payload (K·BLOCK_C values), its
    sample's coefficients A, D from them, and writes y = act(A·x + D). The programs of
    sample 0's first spatial block also store mean / invstd and update the running
    statistics of their channels (each (k, c) has one writer; nothing else reads them here)."""
    n, cb, sb = _plane_tile(c_blocks, s_blocks)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.arange(0, BLOCK_K)
    cmask, kmask = cs < C, ks < K
    kc = ks[:, None] * C + cs[None, :]
    kcm = kmask[:, None] & cmask[None, :]
    count, mean, var = _global_stats(pay_ptr, ks, kc, kcm, K, C, RANKS, ACC)
    invstd = _invstd(var, _scalar(eps, eps_m, eps_l, ACC), ACC)
    first = (n == 0) & (sb == 0)
    # (tl.where, not `kcm & first`: triton 3.9's interpreter rejects a mask that & made of a
    # tensor and a scalar bool)
    kcm1 = tl.where(first, kcm, False)
    tl.store(mean_ptr + kc, mean, mask=kcm1)
    tl.store(invstd_ptr + kc, invstd, mask=kcm1)
    if RUNNING:
        if CUMULATIVE:  # the counter as the local pass copied it (program 0 advances it)
            mom = (1.0 / (tl.load(old_ptr + ks, mask=kmask, other=0.0) + 1.0))[:, None]
        else:
            mom = _scalar(momentum, momentum_m, momentum_l, ACC)
        _update_running(rm_ptr, rv_ptr, ks, cs, srm_k, srm_c, srv_k, srv_c, kcm1, mean, var,
                        count, mom, ACC)
        if COUNT:
            km0 = tl.where(first & (cb == 0), kmask, False)
            old = tl.load(nbt_ptr + ks, mask=km0, other=0)
            tl.store(nbt_ptr + ks, old + (count >= 2).to(old.dtype), mask=km0)
    a, d, _b = _affine_of(kc, kcm, mean, invstd, w_ptr, b_ptr, HAS_W, HAS_B, ACC)
    ns = n + tl.arange(0, 1)
    M, ok = _route(ns, ks, N, K, br_ptr, sbr, mix_ptr, smn, smk, MIXED, ACC)
    s, g, be = _extras(ns, cs, N, C, sc_ptr, g_ptr, be_ptr, SCALE, GAMMA, BETA, ACC)
    A = _to_planes(M, a) * s * g  # [1, BLOCK_C]
    D = _to_planes(M, d) * g + be
    if CHECK:
        A = tl.where(ok[:, None], A, float("nan"))
        D = tl.where(ok[:, None], D, float("nan"))
    ss = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (ss < S)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + _tile(n, cs, ss, sxn, sxc, sxs), mask=mask, other=0.0).to(ACC)
    f = A * x + D
    if RELU:
        f = tl.where(f <= 0, 0.0, f)
    tl.store(out_ptr + _tile(n, cs, ss, son, soc, sos), f.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _sync_grad_coefficients(pay_ptr, fpay_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, ks, cs, K,
                            C, S, RANKS, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                            ACC: tl.constexpr):
    """Per-(k, c) values of the synchronized backward after its all-reduce: the global T1,
    T2 (payload [2, K, C]), the forward's global counts and variance (its payload), the
    coefficients and Q_k, R_k."""
    kc = ks[:, None] * C + cs[None, :]
    kcm = (ks < K)[:, None] & (cs < C)[None, :]
    T1 = tl.load(pay_ptr + kc, mask=kcm, other=0.0)
    T2 = tl.load(pay_ptr + K * C + kc, mask=kcm, other=0.0)
    count, _gm, var = _global_stats(fpay_ptr, ks, kc, kcm, K, C, RANKS, ACC)
    mu, r, a, d, _ae, _de, _b = _coefficients(ks, cs, K, C, mean_ptr, invstd_ptr, w_ptr, b_ptr,
                                             ks < 0, HAS_W, HAS_B, ACC)
    Qk, Rk, Wk = _qr_coefficients(T1, T2, count / S, S, mu, r, a)
    return T1, T2, Wk, var, mu, r, a, d, Qk, Rk


@triton.jit
def _sync_dx_kernel(dy_ptr, x_ptr, out_ptr, parts_ptr, planes_ptr, br_ptr, sbr, mix_ptr, smn,
                    smk, mean_ptr, invstd_ptr, w_ptr, b_ptr, sc_ptr, g_ptr, be_ptr, dg_ptr,
                    dbe_ptr, ds_ptr, dmix_ptr, pay_ptr, fpay_ptr, N, C, S, T, K, sdn, sdc, sds,
                    sxn, sxc, sxs, son, soc, sos, c_blocks, s_blocks, RANKS,
                    DX: tl.constexpr, MIXED: tl.constexpr, RELU: tl.constexpr,
                    NEED_G: tl.constexpr, NEED_BE: tl.constexpr, NEED_S: tl.constexpr,
                    NEED_MIX: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    SCALE: tl.constexpr, GAMMA: tl.constexpr, BETA: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_CM: tl.constexpr, ACC: tl.constexpr):
    """The synchronized BN's backward after its all-reduce: the gradient kernel's pass 2 and
    dx in one launch. Every program works out the per-(k, c) coefficients of its channels
    from the global sums (K·BLOCK_C values), its plane's P, Q, R from them, and writes its dx
    tile; the first spatial block also writes the plane's d γ, d β and d scale, and each
    sample's first program sums its d mix over all channels, BLOCK_CM at a time."""
    n, cb, sb = _plane_tile(c_blocks, s_blocks)
    ns = n + tl.arange(0, 1)
    ks = tl.arange(0, BLOCK_K)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    T1, T2, Wk, var, mu, r, a, d, Qk, Rk = _sync_grad_coefficients(
        pay_ptr, fpay_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, ks, cs, K, C, S, RANKS, HAS_W,
        HAS_B, ACC)
    P, Q, R, A, D, _dm = _plane_grads(
        parts_ptr, planes_ptr, br_ptr, sbr, mix_ptr, smn, smk, sc_ptr, g_ptr, be_ptr, dg_ptr,
        dbe_ptr, ds_ptr, dg_ptr, dg_ptr, dg_ptr, dg_ptr, dg_ptr, ns, cs, ks, N, C, S, T, K, T1,
        T2, Wk, var, mu, r, a, d, a, d, Qk, Rk, sb == 0, MIXED, True, RELU, False, NEED_G,
        NEED_BE, NEED_S, False, SCALE, GAMMA, BETA, ACC)
    if DX:
        sc = P
        if SCALE:
            sc = tl.load(sc_ptr + ns[:, None] * C + cs[None, :], mask=(cs < C)[None, :],
                         other=0.0).to(ACC)
        ss = sb * BLOCK_S + tl.arange(0, BLOCK_S)
        _dx_tile(dy_ptr, x_ptr, out_ptr, n, cs, ss, C, S, sdn, sdc, sds, sxn, sxc, sxs, son,
                 soc, sos, P, Q, R, sc, A, D, True, RELU, SCALE, ACC)
    if NEED_MIX:
        if (cb == 0) & (sb == 0):
            acc = tl.zeros([1, BLOCK_K], ACC)
            for c0 in range(0, C, BLOCK_CM):
                cm = c0 + tl.arange(0, BLOCK_CM)
                T1m, T2m, Wm, vm, mum, rm, am, dm_, Qm, Rm = _sync_grad_coefficients(
                    pay_ptr, fpay_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, ks, cm, K, C, S,
                    RANKS, HAS_W, HAS_B, ACC)
                _p, _q, _r, _a, _d, dm = _plane_grads(
                    parts_ptr, planes_ptr, br_ptr, sbr, mix_ptr, smn, smk, sc_ptr, g_ptr, be_ptr,
                    dg_ptr, dbe_ptr, ds_ptr, dg_ptr, dg_ptr, dg_ptr, dg_ptr, dg_ptr, ns, cm, ks,
                    N, C, S, T, K, T1m, T2m, Wm, vm, mum, rm, am, dm_, am, dm_, Qm, Rm, False,
                    MIXED, True, False, False, False, False, False, True, SCALE, GAMMA, False,
                    ACC)
                acc += dm
            ks1 = ks + tl.zeros([1, BLOCK_K], tl.int32)
            tl.store(dmix_ptr + n * K + ks1, acc, mask=ks1 < K)


@torch.no_grad()
def sync_bn_forward(x, branch, mix, weight, bias, running_mean, running_var,
                    num_batches_tracked, input_scale, film_gamma, film_beta, num_branches,
                    momentum, cumulative, eps, relu, all_reduce, rank=0, world=1):
    """The synchronized BN's forward in training (fastrobust.distributed): the moments and
    the statistics kernel's local pass write this rank's fp64 sums [count K | centre K·C |
    Σ(u − centre) K·C | Σ(u − centre)² K·C] into its row `rank` of a [world, ...] payload
    (zeros in the others), ``all_reduce(payload)`` gathers the rows (a sum of rows only one
    rank filled), and one kernel merges them exactly and normalizes with the global
    statistics (and updates the running ones). Three launches and the collective; nothing
    on the host reads a value. x must not be empty. Returns (y, mean, invstd, planes, payload)."""
    K = num_branches
    _check_routing(x, branch, mix, K, True, prefix="sync_")
    x3, y, mean, invstd, planes = _forward_outputs(x, mix, K, True)
    N, C, S = x3.shape
    dev, acc = x.device, mean.dtype
    mixed = mix is not None
    pay = torch.empty(world, K + 3 * K * C, device=dev, dtype=torch.float64)
    running = running_mean is not None
    rm, rv = _written_running(running_mean, running_var, running)
    nbt = num_batches_tracked if num_batches_tracked is not None and running else None
    cumulative = bool(cumulative) and nbt is not None
    old = torch.empty(K if cumulative else 0, device=dev, dtype=acc)
    with on_device(x):
        _stats(x, x3, branch, mix, input_scale, None, None, None, None, None, None, nbt, mean,
               invstd, x, x, old, planes, pay, K, momentum, eps, True, False, cumulative,
               sync=1, rank=rank, ranks=world)
        all_reduce(pay)
        s, g, be = _c(input_scale), _c(film_gamma), _c(film_beta)
        w, b = _c(weight), _c(bias)
        y3 = _ncs(y)
        block_c, block_s = _blocks(x3, False)
        c_blocks = triton.cdiv(C, block_c)
        s_blocks = triton.cdiv(max(S, 1), block_s)
        launch(_sync_apply_kernel, _tiles_grid(N, c_blocks, s_blocks), x3, y3, pay,
               *_route_args(branch, mix, x), x if s is None else s, x if g is None else g,
               x if be is None else be, x if w is None else w, x if b is None else b,
               x if rm is None else rm, x if rv is None else rv, *_running_strides(rm, rv, C),
               x if nbt is None else nbt, old,
               mean, invstd, N, C, S, K, *x3.stride(), *y3.stride(), c_blocks, s_blocks,
               *fp32_parts(momentum), *fp32_parts(eps), world, MIXED=mixed,
               RUNNING=running, CUMULATIVE=cumulative, COUNT=nbt is not None, CHECK=True,
               HAS_W=w is not None, HAS_B=b is not None, SCALE=s is not None, GAMMA=g is not None,
               BETA=be is not None, RELU=relu, BLOCK_K=triton.next_power_of_2(max(K, 1)),
               BLOCK_C=block_c, BLOCK_S=block_s, ACC=_tl_acc(acc))
    return y, mean, invstd, planes, pay
