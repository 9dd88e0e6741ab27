"""Triton kernels of the synchronized routed / mixed BN (fastrobust.distributed), the CUDA
implementation of the registered ops sync_bn_stats, sync_bn_apply, sync_bn_grad_sums and
sync_bn_dx (csrc/batch_norm/ops.cpp; launched from C++ by csrc/launch/plans.cpp like every
other op). The BN's own statistics and gradient kernels run their local pass (this rank's
sums), the op sync_multi_bn (csrc/batch_norm/autograd.cpp) all-reduces them, and one kernel
here finishes each direction with the global sums:

  forward   sync_bn_stats: triton._moments_kernel → triton._bn_stats_kernel (SYNC=1: this
            rank's fp64 sums [count K | centre K·C | Σ(u − centre) K·C | Σ(u − centre)² K·C]
            in its row of a [world, ...] payload, zeros in the others) → all-reduce (the rows
            gathered) → sync_bn_apply: _sync_apply_kernel (the exact merge to the global
            statistics, running statistics, coefficients and y in one pass)
  backward  sync_bn_grad_sums: triton_backward._grad_sums_kernel → _bn_grads_kernel
            (SYNC=1: this rank's T1, T2) → all-reduce → sync_bn_dx: _sync_dx_kernel (each
            plane's results from the global sums, and dx)

Three launches and one collective each way; nothing on the host reads a value."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import on_device
from .._triton.plan import fp32_parts, launch
from .triton_parts import (_affine_of, _check_routing, _coefficients, _dx_tile, _extras,
                        _invstd, _plane_grads, _qr_coefficients, _route, _route_args,
                        _stats_blocks, _to_planes, _update_running)
from .._triton.tiles import (_blocks, _c, _like, _ncs, _plane_tile, _scalar, _splits, _tile,
                      _tiles_grid, _tl_acc)
from .._common import acc_dtype
from . import sync_eager
from .schema import backward_needs, sync_apply_args
from .triton import _running_strides, _stats, _written_running
from .triton_backward import _bn_grads_kernel, _grad_setup, _grad_sums_kernel


@triton.jit
def _global_stats(pay_ptr, ks, kc, kcm, K, C, RANKS, ACC: tl.constexpr):
    """Per-(k, c) count, mean and biased variance from the all-reduced fp64 payload, one row
    per rank [count K | centre K·C | R K·C | Q K·C] (R, Q: the rank's Σ(u − centre),
    Σ(u − centre)²). An exact merge (Chan's, cross terms included; sync_eager.py
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


# --- the launchers of the registered ops (csrc/batch_norm/ops.cpp: sync_bn_stats, sync_bn_apply,
# sync_bn_grad_sums, sync_bn_dx); sync_multi_bn (csrc/batch_norm/autograd.cpp) runs the
# all-reduces ------------------------------------------------------------------------------

# An empty local batch (the kernels' grids would be empty, and the global statistics must still
# be written), or sync_bn_dx with `parts` from another implementation, runs the eager
# implementation; its ATen ops keep such a call's plan from being replayed (said once:
# plans.cpp).

@torch.no_grad()
def sync_bn_stats(x, branch, mix, input_scale, num_batches_tracked, num_branches, cumulative,
                  rank, world_size):
    """This rank's fp64 sums [count K | centre K·C | R K·C | Q K·C] into row `rank` of the
    [world_size, K + 3·K·C] payload (zeros in the others), the planes' moments (mixed) and
    the counter's copy for a cumulative momentum: the moments kernel and the statistics
    kernel's local pass (two launches; one for one value a plane)."""
    if x.numel() == 0:
        return sync_eager.sync_bn_stats(x, branch, mix, input_scale, num_batches_tracked,
                                       num_branches, cumulative, rank, world_size)
    K = num_branches
    _check_routing(x, branch, mix, K, True, prefix="sync_")
    x3 = _ncs(x)
    N, C, S = x3.shape
    dev, acc = x.device, acc_dtype(x)
    planes = torch.empty((2, N, C) if mix is not None else (0,), device=dev, dtype=acc)
    pay = torch.empty(world_size, K + 3 * K * C, device=dev, dtype=torch.float64)
    nbt = num_batches_tracked
    cumulative = bool(cumulative) and nbt is not None
    old = torch.empty(K if cumulative else 0, device=dev, dtype=acc)
    with on_device(x):
        _stats(x, x3, branch, mix, input_scale, None, None, None, None, None, None, nbt, x, x,
               x, x, old, planes, pay, K, 0.0, 1.0, True, False, cumulative, sync=1, rank=rank,
               ranks=world_size)
    return pay, planes, old


@torch.no_grad()
def sync_bn_apply(*args):
    """One kernel after the all-reduce: the ranks' rows merged exactly to the global
    statistics, the running statistics updated, the coefficients and y = act(A·x + D)."""
    a, payload, old = sync_apply_args(args)
    if a.x.numel() == 0:
        return sync_eager.sync_bn_apply(*args)
    x, branch, mix, K = a.x, a.branch, a.mix, a.num_branches
    x3, y = _ncs(x), _like(x)
    N, C, S = x3.shape
    dev, acc = x.device, acc_dtype(x)
    mean = torch.empty(K, C, device=dev, dtype=acc)
    invstd = torch.empty(K, C, device=dev, dtype=acc)
    mixed = mix is not None
    running = a.running_mean is not None
    rm, rv = _written_running(a.running_mean, a.running_var, running)
    nbt = a.num_batches_tracked if running else None
    cumulative = bool(a.cumulative) and nbt is not None
    with on_device(x):
        s, g, be = _c(a.input_scale), _c(a.film_gamma), _c(a.film_beta)
        w, b = _c(a.weight), _c(a.bias)
        y3 = _ncs(y)
        block_c, block_s = _blocks(x3, False)
        c_blocks = triton.cdiv(C, block_c)
        s_blocks = triton.cdiv(max(S, 1), block_s)
        launch(_sync_apply_kernel, _tiles_grid(N, c_blocks, s_blocks), x3, y3, payload,
               *_route_args(branch, mix, x), x if s is None else s, x if g is None else g,
               x if be is None else be, x if w is None else w, x if b is None else b,
               x if rm is None else rm, x if rv is None else rv, *_running_strides(rm, rv, C),
               x if nbt is None else nbt, old if cumulative else x, mean, invstd, N, C, S, K,
               *x3.stride(), *y3.stride(), c_blocks, s_blocks, *fp32_parts(a.momentum),
               *fp32_parts(a.eps), payload.shape[0],
               MIXED=mixed, RUNNING=running, CUMULATIVE=cumulative, COUNT=nbt is not None,
               CHECK=True, HAS_W=w is not None, HAS_B=b is not None, SCALE=s is not None,
               GAMMA=g is not None, BETA=be is not None, RELU=a.relu,
               BLOCK_K=triton.next_power_of_2(max(K, 1)), BLOCK_C=block_c, BLOCK_S=block_s,
               ACC=_tl_acc(acc))
    return y, mean, invstd


@torch.no_grad()
def sync_bn_grad_sums(dy, x, branch, mix, weight, bias, mean, invstd, input_scale, film_gamma,
                      film_beta, num_branches, relu, needs):
    """This rank's T1 = Σ M·dz, T2 = Σ M·dz·x̂ ([2, K, C], for the all-reduce), its own
    dweight = T2 and dbias = T1, and the per-plane partial sums the dx kernel reads: the BN
    gradient kernels' first pass (two launches)."""
    if x.numel() == 0:
        return sync_eager.sync_bn_grad_sums(dy, x, branch, mix, weight, bias, mean, invstd,
                                           input_scale, film_gamma, film_beta, num_branches,
                                           relu, needs)
    need_x, need_mix, need_w, need_b, need_s, need_g, need_be = backward_needs(
        needs, mix, input_scale, film_gamma, film_beta)
    K, C = mean.shape
    acc = mean.dtype
    ACC = _tl_acc(acc)
    dev = x.device
    x3, dy3 = _ncs(x), _ncs(dy)
    N, S = x3.shape[0], x3.shape[2]
    route, flags, ptrs = _grad_setup(x, branch, mix, weight, bias, input_scale, film_gamma,
                                     film_beta)
    dweight = torch.empty(K, C, device=dev, dtype=acc)
    dbias = torch.empty(K, C, device=dev, dtype=acc)
    sums = torch.empty(2, K, C, device=dev, dtype=acc)
    unused = x.new_empty(0, dtype=acc)
    block_n, block_k, stats_c = _stats_blocks(N, K, C, values=256)
    with on_device(x):
        block_c, block_s = _blocks(x3, True)
        c_blocks = triton.cdiv(C, block_c)
        T, chunk = _splits(N, c_blocks, S, block_s)
        parts = torch.empty(4 if need_s else 2, T, N, C, device=dev, dtype=acc)
        launch(_grad_sums_kernel, (N * c_blocks, T), dy3, x3, parts, parts[1], *route, mean,
               invstd, *ptrs, N, C, S, chunk, K, c_blocks, *dy3.stride(), *x3.stride(),
               SINGLE=False, RELU=relu, SUMS_X=need_s, BLOCK_K=block_k, BLOCK_C=block_c,
               BLOCK_S=block_s, ACC=ACC, **flags)
        # T1, T2 only: what only pass 2 reads is off, and half the samples per step (ptxas
        # spilled 4 B on sm_90 for mixed + extras, K=5)
        off = {k: False for k in ("HAS_W", "HAS_B", "BETA")}
        launch(_bn_grads_kernel, (triton.cdiv(C, stats_c),), parts, x, *route, mean, invstd,
               *ptrs, dweight, dbias, unused, unused, unused, unused, unused, unused, unused,
               unused, unused, sums, N, C, S, T, K, SYNC=True, BATCH=False,
               BLOCK_N=max(1, block_n // 2), BLOCK_K=block_k, BLOCK_C=stats_c, ACC=ACC,
               RELU=False, NEED_PQR=False, NEED_G=False, NEED_BE=False, NEED_S=False,
               NEED_MIX=False, **{**flags, **off})
    return (sums, parts, dweight if need_w else x.new_empty(0, dtype=acc),
            dbias if need_b else x.new_empty(0, dtype=acc))


@torch.no_grad()
def sync_bn_dx(dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale, film_gamma,
               film_beta, sums, parts, payload, num_branches, relu, needs):
    """One kernel after the all-reduce: each plane's results from the global T1, T2 and the
    forward's global counts and variance (pass 2 of the gradient kernel), and dx. Returns
    (dx, dmix, dinput_scale, dfilm_gamma, dfilm_beta); an unneeded one is empty."""
    if x.numel() == 0 or parts.numel() == 0:
        return sync_eager.sync_bn_dx(dy, x, branch, mix, weight, bias, mean, invstd, planes,
                                    input_scale, film_gamma, film_beta, sums, parts, payload,
                                    num_branches, relu, needs)
    need_x, need_mix, _w, _b, need_s, need_g, need_be = backward_needs(
        needs, mix, input_scale, film_gamma, film_beta)
    K, C = mean.shape
    acc = mean.dtype
    dev = x.device
    x3, dy3 = _ncs(x), _ncs(dy)
    N, S = x3.shape[0], x3.shape[2]
    T = parts.shape[1]
    route, flags, ptrs = _grad_setup(x, branch, mix, weight, bias, input_scale, film_gamma,
                                     film_beta)
    nc = (N, C)

    def grad(shape, need):  # a fresh one each time: the op's outputs must not alias
        return torch.empty(shape if need else (0,), device=dev, dtype=acc)
    dgamma, dbeta, dscale = grad(nc, need_g), grad(nc, need_be), grad(nc, need_s)
    dmix = grad((N, K), need_mix)
    dx = _like(x) if need_x else x.new_empty(0)
    _bn, block_k, stats_c = _stats_blocks(N, K, C, values=256)
    with on_device(x):
        dx3 = _ncs(dx) if need_x else dy3
        # at most 256 per-(k, c) values and 512 of x a program (wider tiles spilled)
        block_c, block_s = _blocks(x3, False)
        block_c = max(1, min(block_c, 256 // block_k))
        block_s = max(1, min(triton.next_power_of_2(max(S, 1)), 512 // block_c))
        c_blocks = triton.cdiv(C, block_c)
        s_blocks = triton.cdiv(S, block_s) if need_x else 1
        if need_x or need_mix or need_g or need_be or need_s:
            launch(_sync_dx_kernel, _tiles_grid(N, c_blocks, s_blocks), dy3, x3, dx3, parts,
                   planes if planes.numel() else x, *route, mean, invstd, *ptrs, dgamma, dbeta,
                   dscale, dmix, sums, payload, N, C, S, T, K, *dy3.stride(), *x3.stride(),
                   *dx3.stride(), c_blocks, s_blocks, payload.shape[0], DX=need_x, RELU=relu,
                   NEED_G=need_g, NEED_BE=need_be, NEED_S=need_s, NEED_MIX=need_mix,
                   BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_CM=stats_c,
                   ACC=_tl_acc(acc), **flags)
    return dx, dmix, dscale, dgamma, dbeta
