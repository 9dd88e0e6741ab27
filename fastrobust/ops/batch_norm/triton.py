"""Triton kernels of routed and mixed BN with their fused extras (input scale, FiLM, ReLU;
docs/math.md). The synchronized BN's kernels are in sync_triton.py, FiLM / channel
scale in ../film/triton.py, the jit helpers they share in triton_parts.py and ../_triton/tiles.py.

Every op of the family is y = act(A[n,c]·x + D[n,c]) with per-plane coefficients (a plane is one
(n, c)); fastrobust/ops/_eager.py derives the math. On a GPU a call is a fixed, small number of
launches, and nothing of the [N, K, C] algebra runs as separate torch ops:

  forward   _moments_kernel   per (split, n, c): Σ(x − x0), Σ(x − x0)² over a range of the
                              plane, x0 its first value (no Σx² cancellation, no rounded
                              mean: the splits' sums add)
            _bn_stats_kernel  per channel block, looping over the batch: the partials merged
                              exactly (Chan's cross terms included) to per-(k, c) mean and
                              variance (weighted by the routing), the
                              running statistics updated in place, mean / invstd written and
                              the per-plane coefficients A, D of the whole op
            _affine_kernel    y = act(A·x + D)   (and num_batches_tracked += 1 where updated)
  backward  _grad_sums_kernel per (split, n, c): Σg and Σg·(x − centre) (g = dy masked by the
                              ReLU, recomputed from x), and Σ(x − centre), Σ(x − centre)² for
                              the input scale's gradient
            _bn_grads_kernel  per channel block: T1 = Σ M·dz, T2 = Σ M·dz·x̂ (dbias, dweight),
                              dγ, dβ, d(input scale), per-block shares of d mix, and the
                              per-plane P, Q, R of ∂L/∂u = P·g + Q·x + R
            _dx_kernel        dx = s·(P·g + Q·x + R); sums d mix over the channel blocks

The backward's kernels and launcher are in triton_backward.py. Routed BN K=5 forward: 3
launches, backward 3 (benchmarks/launch_counts.py prints them all; tests/test_gpu_path.py
holds the budget). Sample and program offsets are int64, so any
tensor size works. Loads are cast to the accumulation type at once (fp32, fp64 for fp64).

Device-side checks: an out-of-range branch id, or a negative mix weight with batch
statistics, makes that sample's output NaN (the host never reads a value on CUDA); on CPU
tensors (the interpreter) the same inputs raise at once, as on every other backend.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import acc_dtype
from .._triton import on_device
from .._triton.plan import fp32_parts, launch
from .._triton.tiles import (_blocks, _c, _like, _ncs, _plane_split, _plane_tile, _safe,
                             _scalar, _splits, _tile, _tiles_grid, _tl_acc, _zero, no_overlap)
from .schema import BnArgs
from .triton_parts import (_affine_of, _check_routing, _effective, _extras, _invstd,
                           _plane_centres, _plane_sums, _route, _route_args, _running_at,
                           _stats_blocks, _to_branches, _to_planes, _update_running)


# --- forward ------------------------------------------------------------------------------------

@triton.jit
def _moments_kernel(x_ptr, parts_ptr, N, C, S, CHUNK, c_blocks, sxn, sxc, sxs,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """Per (split, n, c): Σ(x − x0) and Σ(x − x0)² over the split's range of the plane, about
    the plane's first value x0 (every split of a plane uses the same centre, so the splits'
    sums just add: no mean is rounded, no cross term is lost)."""
    n, cs, cmask, t, T, start, end = _plane_split(c_blocks, C, S, CHUNK, BLOCK_C)
    base = x_ptr + n * sxn
    x0 = tl.load(base + cs.to(tl.int64) * sxc, mask=tl.where(S > 0, cmask, False),
                 other=0.0).to(ACC)
    p_r = tl.zeros([BLOCK_C], ACC)
    p_q = tl.zeros([BLOCK_C], ACC)
    for s0 in range(start, end, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        mask = (ss < end)[:, None] & cmask[None, :]
        v = tl.load(base + _tile(0, cs, ss, 0, sxc, sxs), mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, v - x0[None, :], 0.0)
        p_r += tl.sum(d, 0)
        p_q += tl.sum(d * d, 0)
    NC = N * C
    off = t * NC + n * C + cs
    tl.store(parts_ptr + off, p_r, mask=cmask)
    tl.store(parts_ptr + T * NC + off, p_q, mask=cmask)


@triton.jit
def _bn_stats_kernel(parts_ptr, x_ptr, sxn, sxc, br_ptr, sbr, mix_ptr, smn, smk,
                     sc_ptr, g_ptr, be_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, srm_k, srm_c,
                     srv_k, srv_c, nbt_ptr,
                     mean_ptr, invstd_ptr, A_ptr, D_ptr, cnt_ptr, planes_ptr, pay_ptr,
                     N, C, S, T, CHUNK, K, momentum, momentum_m, momentum_l, eps, eps_m,
                     eps_l, rank, ranks, SYNC: tl.constexpr, MIXED: tl.constexpr,
                     BATCH: tl.constexpr,
                     RUNNING: tl.constexpr,
                     CUMULATIVE: tl.constexpr, FROM_X: tl.constexpr, PLANES: tl.constexpr,
                     CHECK: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     SCALE: tl.constexpr, GAMMA: tl.constexpr, BETA: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                     ACC: tl.constexpr):
    pid = tl.program_id(0)
    cs = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.arange(0, BLOCK_K)
    cmask, kmask = cs < C, ks < K
    kc = ks[:, None] * C + cs[None, :]
    kcm = kmask[:, None] & cmask[None, :]
    if BATCH:
        # An exact merge (Chan's, cross terms included; fastrobust/ops/_eager.py
        # `branch_stats`): pass 1 picks a centre per (k, c), the weighted mean of the
        # planes' centres; pass 2 moves every plane's sums about its own centre to it.
        W = tl.zeros([BLOCK_K], ACC)
        nnz = tl.zeros([BLOCK_K], ACC)
        ck = tl.zeros([BLOCK_K, BLOCK_C], ACC)
        for n0 in range(0, N, BLOCK_N):
            ns = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            M, _ = _route(ns, ks, N, K, br_ptr, sbr, mix_ptr, smn, smk, MIXED, ACC)
            uc = _plane_centres(ns, cs, N, C, S, x_ptr, sxn, sxc, ACC)
            if SCALE:
                s, _g, _b = _extras(ns, cs, N, C, sc_ptr, g_ptr, be_ptr, SCALE, False, False,
                                    ACC)
                uc = uc * s
            W += tl.sum(M, 0)
            ck += _to_branches(M, uc)
        ck = ck / _safe(W)[:, None]
        R = tl.zeros([BLOCK_K, BLOCK_C], ACC)
        Q = tl.zeros([BLOCK_K, BLOCK_C], ACC)
        for n0 in range(0, N, BLOCK_N):
            ns = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            M, _ = _route(ns, ks, N, K, br_ptr, sbr, mix_ptr, smn, smk, MIXED, ACC)
            # (counted here, not in pass 1: a count finished before this loop is held across
            # it, and that spilled registers on sm_90)
            nnz += tl.sum((M != 0).to(ACC), 0)
            uc, ur, uq = _plane_sums(ns, cs, N, C, S, T, parts_ptr, x_ptr, sxn, sxc, FROM_X,
                                     ACC)
            if PLANES:
                nc = ns[:, None] * C + cs[None, :]
                ncm = (ns < N)[:, None] & cmask[None, :]
                Sf = tl.maximum(S, 1).to(ACC)
                tl.store(planes_ptr + nc, uc + ur / Sf, mask=ncm)
                tl.store(planes_ptr + N * C + nc, uq - ur * ur / Sf, mask=ncm)
            s, _g, _b = _extras(ns, cs, N, C, sc_ptr, g_ptr, be_ptr, SCALE, False, False, ACC)
            uc = uc * s
            ur = ur * s
            uq = uq * s * s
            d = uc[:, None, :] - ck[None, :, :]  # Σ(u − ck) = ur + S·d, Σ(u − ck)² below
            Mb = M[:, :, None]
            ur3 = ur[:, None, :]
            R += tl.sum(tl.where(Mb != 0, Mb * (ur3 + S * d), 0.0), 0)
            Q += tl.sum(tl.where(Mb != 0, Mb * (uq[:, None, :] + (2 * ur3 + S * d) * d), 0.0),
                        0)
        count = W * S
        cz = _safe(count)[:, None]
        mean = ck + R / cz
        m2 = Q - R * R / cz
        var = tl.maximum(m2 / cz, 0.0)
        if SYNC == 1:
            # The synchronized BN's local pass: this rank's count and sums about the centre per
            # (k, c), in fp64 (a centre is exact in any dtype: merged again with its cross
            # terms, nothing of a rounding is lost), into its row `rank` of the [ranks, P]
            # payload, and zeros into the other rows (the all-reduce's sum gathers the rows;
            # a zero fill would be a launch of its own); and a copy of num_batches_tracked for
            # the apply kernel's cumulative momentum (it advances the counter while other
            # programs would still read it).
            P = K + 3 * K * C
            for r in range(0, ranks):
                mine = r == rank
                row = pay_ptr + r * P
                tl.store(row + K + kc, tl.where(mine, ck.to(tl.float64), 0.0), mask=kcm)
                tl.store(row + K + K * C + kc, tl.where(mine, R.to(tl.float64), 0.0), mask=kcm)
                tl.store(row + K + 2 * K * C + kc, tl.where(mine, Q.to(tl.float64), 0.0),
                         mask=kcm)
                if pid == 0:
                    tl.store(row + ks, tl.where(mine, count.to(tl.float64), 0.0), mask=kmask)
            if pid == 0:
                if CUMULATIVE:
                    tl.store(cnt_ptr + ks, tl.load(nbt_ptr + ks, mask=kmask, other=0).to(ACC),
                             mask=kmask)
        if RUNNING:
            if CUMULATIVE:
                mom = 1.0 / (tl.load(nbt_ptr + ks, mask=kmask, other=0).to(ACC) + 1.0)
                mom = mom[:, None]
            else:
                mom = _scalar(momentum, momentum_m, momentum_l, ACC)
            _update_running(rm_ptr, rv_ptr, ks, cs, srm_k, srm_c, srv_k, srv_c, kcm, mean, var,
                            count, mom, ACC)
            if pid == 0:  # num_batches_tracked is advanced by the next kernel, after all reads
                tl.store(cnt_ptr + ks, count, mask=kmask)
        single = tl.where(S == 1, nnz == 1, False)
    else:
        mean = tl.load(rm_ptr + _running_at(ks, cs, srm_k, srm_c), mask=kcm, other=0.0).to(ACC)
        var = tl.load(rv_ptr + _running_at(ks, cs, srv_k, srv_c), mask=kcm, other=1.0).to(ACC)
        single = ks < 0
    if SYNC == 0:
        _bn_stats_tail(br_ptr, sbr, mix_ptr, smn, smk, sc_ptr, g_ptr, be_ptr, w_ptr, b_ptr,
                       mean_ptr, invstd_ptr, A_ptr, D_ptr, mean, var, single, ks, cs, kc, kcm,
                       N, C, K, _scalar(eps, eps_m, eps_l, ACC), MIXED, CHECK, HAS_W, HAS_B,
                       SCALE, GAMMA, BETA, BLOCK_N, ACC)


@triton.jit
def _bn_stats_tail(br_ptr, sbr, mix_ptr, smn, smk, sc_ptr, g_ptr, be_ptr, w_ptr, b_ptr,
                   mean_ptr, invstd_ptr, A_ptr, D_ptr, mean, var, single, ks, cs, kc, kcm,
                   N, C, K, eps, MIXED: tl.constexpr, CHECK: tl.constexpr,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, SCALE: tl.constexpr,
                   GAMMA: tl.constexpr, BETA: tl.constexpr, BLOCK_N: tl.constexpr,
                   ACC: tl.constexpr):
    """mean / invstd stored and the per-plane coefficients A, D of the whole op. The
    coefficients come from the registers that were stored, never from a load of mean_ptr /
    invstd_ptr: other threads of this program stored them, and nothing orders those stores
    before a load on a GPU (docs/backends.md, "Memory ordering")."""
    cmask = cs < C
    invstd = _invstd(var, eps, ACC)
    tl.store(mean_ptr + kc, mean, mask=kcm)
    tl.store(invstd_ptr + kc, invstd, mask=kcm)
    a, d, b = _affine_of(kc, kcm, mean, invstd, w_ptr, b_ptr, HAS_W, HAS_B, ACC)
    a_eff, d_eff = _effective(a, d, b, single)
    for n0 in range(0, N, BLOCK_N):
        ns = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        M, ok = _route(ns, ks, N, K, br_ptr, sbr, mix_ptr, smn, smk, MIXED, ACC)
        s, g, be = _extras(ns, cs, N, C, sc_ptr, g_ptr, be_ptr, SCALE, GAMMA, BETA, ACC)
        A = _to_planes(M, a_eff) * s * g
        D = _to_planes(M, d_eff) * g + be
        if CHECK:  # an invalid routing poisons its sample instead of passing silently
            A = tl.where(ok[:, None], A, float("nan"))
            D = tl.where(ok[:, None], D, float("nan"))
        nc = ns[:, None] * C + cs[None, :]
        ncm = (ns < N)[:, None] & cmask[None, :]
        tl.store(A_ptr + nc, A, mask=ncm)
        tl.store(D_ptr + nc, D, mask=ncm)


@triton.jit
def _affine_kernel(x_ptr, out_ptr, a_ptr, d_ptr, C, S, sxn, sxc, sxs, son, soc, sos, san,
                   sac, sdn, sdc, c_blocks, s_blocks, nbt_ptr, cnt_ptr, K,
                   HAS_A: tl.constexpr, HAS_D: tl.constexpr, RELU: tl.constexpr,
                   COUNT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    n, cb, sb = _plane_tile(c_blocks, s_blocks)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    cmask = cs < C
    mask = (ss < S)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + _tile(n, cs, ss, sxn, sxc, sxs), mask=mask,
                other=0.0).to(ACC)
    f = x
    if HAS_A:
        a = tl.load(a_ptr + n * san + cs.to(tl.int64) * sac, mask=cmask, other=0.0)
        f = a.to(ACC)[None, :] * x
    if HAS_D:
        d = tl.load(d_ptr + n * sdn + cs.to(tl.int64) * sdc, mask=cmask, other=0.0)
        f += d.to(ACC)[None, :]
    if RELU:
        f = tl.where(f <= 0, 0.0, f)
    tl.store(out_ptr + _tile(n, cs, ss, son, soc, sos),
             f.to(out_ptr.dtype.element_ty), mask=mask)
    if COUNT:  # a branch's counter advances when its running stats were updated
        if tl.program_id(0) == 0:
            ks = tl.arange(0, BLOCK_K)
            cnt = tl.load(cnt_ptr + ks, mask=ks < K, other=0.0)
            old = tl.load(nbt_ptr + ks, mask=ks < K, other=0)
            tl.store(nbt_ptr + ks, old + (cnt >= 2).to(old.dtype), mask=ks < K)


# --- the op (csrc/batch_norm/ops.cpp: multi_bn)    ---------------------------------------

@torch.no_grad()
def multi_bn(*args):
    """fastrobust::multi_bn: (y, mean, invstd, planes); the kernels update the running
    statistics in place."""
    a = BnArgs(*args)
    x, branch, mix, K = a.x, a.branch, a.mix, a.num_branches
    batch = a.batch_stats
    _check_routing(x, branch, mix, K, batch)
    x3, y, mean, invstd, planes = _forward_outputs(x, mix, K, batch)
    N, C, S = x3.shape
    dev, acc = x.device, mean.dtype
    if N * C == 0:
        with on_device(x):
            _zero(mean, invstd)
        return y, mean, invstd, planes
    running = a.updates_running
    rm, rv = _written_running(a.running_mean, a.running_var, running)
    nbt = a.num_batches_tracked if running else None
    count = torch.empty(K if running else 0, device=dev, dtype=acc)
    A = torch.empty(N, C, device=dev, dtype=acc)
    D = torch.empty(N, C, device=dev, dtype=acc)
    with on_device(x):
        _stats(x, x3, branch, mix, a.input_scale, a.film_gamma, a.film_beta, a.weight, a.bias,
               rm, rv, nbt, mean, invstd, A, D, count, planes, x, K, a.momentum, a.eps, batch,
               running, a.cumulative, sync=0)
        _affine(x3, _ncs(y), A, D, a.relu, nbt, count, K)
    return y, mean, invstd, planes


def _forward_outputs(x, mix, K, batch):
    """x as [N, C, S], and the forward's outputs: y, mean, invstd ([K, C]) and the planes'
    moments ([2, N, C], mixed BN with batch statistics; else empty)."""
    acc = acc_dtype(x)
    x3 = _ncs(x)
    N, C = x3.shape[:2]
    mean = torch.empty(K, C, device=x.device, dtype=acc)
    invstd = torch.empty(K, C, device=x.device, dtype=acc)
    planes = torch.empty((2, N, C) if mix is not None and batch else (0,), device=x.device,
                         dtype=acc)
    return x3, _like(x), mean, invstd, planes


def _written_running(rm, rv, written):
    """The running statistics, read and written in place through their strides
    (`_running_strides`); ones the kernels write must not overlap themselves."""
    if written and rm is not None:
        for name, t in (("running_mean", rm), ("running_var", rv)):
            if not no_overlap(t):
                raise ValueError(f"fastrobust: {name} has elements that share memory (strides "
                                 f"{tuple(t.stride())}); the training update writes each one")
    return rm, rv


def _running_strides(rm, rv, C):
    """(rm's, rv's) strides of k and c, the kernels' srm_k, srm_c, srv_k, srv_c."""
    if rm is None:
        return C, 1, C, 1
    return (*rm.stride(), *rv.stride())


def _stats(x, x3, branch, mix, s, g, be, w, b, rm, rv, nbt, mean, invstd, A, D, count, planes,
           pay, K, momentum, eps, batch, running, cumulative, sync, rank=0, ranks=1):
    """The moments kernel (batch statistics of planes with more than one value) and the
    statistics kernel; sync=1: its synchronized BN's local pass (this rank's row `rank` of
    the payload `pay` [ranks, K + 3·K·C], zeros in the others)."""
    N, C, S = x3.shape
    acc = acc_dtype(x)
    from_x = S == 1
    T, chunk = 1, max(S, 1)
    parts = x  # unused unless the partials are needed
    if batch and not from_x:
        block_c, block_s = _blocks(x3, True)
        c_blocks = triton.cdiv(C, block_c)
        T, chunk = _splits(N, c_blocks, S, block_s)
        parts = torch.empty(2, T, N, C, device=x.device, dtype=acc)
        launch(_moments_kernel, (N * c_blocks, T), x3, parts, N, C, S, chunk, c_blocks,
               *x3.stride(), BLOCK_C=block_c, BLOCK_S=block_s, ACC=_tl_acc(acc))
    # tiles of 512 values for one or two branches with batch statistics (1024 spilled
    # registers on sm_90 there: benchmarks/aot_compile.py --strict-spills), else 1024
    block_n, block_k, block_c = _stats_blocks(N, K, C, values=512 if batch and K <= 2 else 1024)
    s, g, be, w, b = _c(s), _c(g), _c(be), _c(w), _c(b)
    mixed = mix is not None
    launch(_bn_stats_kernel, (triton.cdiv(C, block_c),), parts, x3, x3.stride(0), x3.stride(1),
           *_route_args(branch, mix, x), x if s is None else s, x if g is None else g,
           x if be is None else be, x if w is None else w, x if b is None else b,
           x if rm is None else rm, x if rv is None else rv, *_running_strides(rm, rv, C),
           x if nbt is None else nbt, mean,
           invstd, A, D, count, planes, pay, N, C, S, T, chunk, K, *fp32_parts(momentum),
           *fp32_parts(eps), rank, ranks, SYNC=sync, MIXED=mixed, BATCH=batch, RUNNING=running,
           CUMULATIVE=bool(cumulative) and nbt is not None, FROM_X=from_x, PLANES=mixed and batch,
           CHECK=not mixed or batch, HAS_W=w is not None, HAS_B=b is not None, SCALE=s is not None,
           GAMMA=g is not None, BETA=be is not None, BLOCK_N=block_n, BLOCK_K=block_k,
           BLOCK_C=block_c, ACC=_tl_acc(acc), num_warps=_warps(block_k))


def _warps(block_k: int) -> int:
    """Warps of the per-channel-block kernels: 8 for more than four branches (their tiles
    spilled registers on sm_90 with 4: benchmarks/aot_compile.py --strict-spills), else 4."""
    return 8 if block_k >= 8 else 4


def _affine(x3, y3, A, D, relu, nbt=None, count=None, K=0):
    N, C, S = x3.shape
    if N * C * S == 0:
        return
    block_c, block_s = _blocks(x3, False)
    c_blocks, s_blocks = triton.cdiv(C, block_c), triton.cdiv(S, block_s)
    dummy = x3
    launch(_affine_kernel, _tiles_grid(N, c_blocks, s_blocks), x3, y3, dummy if A is None else A,
           dummy if D is None else D, C, S, *x3.stride(), *y3.stride(),
           *((0, 0) if A is None else A.stride()), *((0, 0) if D is None else D.stride()),
           c_blocks, s_blocks, dummy if nbt is None else nbt, dummy if count is None else count, K,
           HAS_A=A is not None, HAS_D=D is not None, RELU=relu, COUNT=nbt is not None,
           BLOCK_K=triton.next_power_of_2(max(K, 1)), BLOCK_C=block_c, BLOCK_S=block_s,
           ACC=_tl_acc(acc_dtype(x3)))
