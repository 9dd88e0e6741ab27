"""The eager implementation of the synchronized BN's halves (csrc/batch_norm/ops.cpp: sync_bn_stats,
sync_bn_apply, sync_bn_grad_sums, sync_bn_dx) in plain PyTorch, for devices without kernels of
their own and the forced 'eager' backend; csrc/batch_norm/sync_cpu.cpp is its C++ twin for the CPU.
The op sync_multi_bn (csrc/batch_norm/autograd.cpp) runs them around its two all-reduces.

    sync_bn_stats      each plane's centre c (its mean as rounded) and r = Σ(x − c),
                       q = Σ(x − c)² (fp64), moved to one centre per (k, c) (the weighted mean
                       of the planes' centres) and added: this rank's count, centre,
                       R = Σ(u − centre), Q = Σ(u − centre)² (u = input_scale·x) in its row of
                       the [world, K + 3·K·C] payload
    sync_bn_apply      the rows merged exactly (`merge_ranks`), y from the BN with those
                       statistics as its running ones, the running statistics updated
    sync_bn_grad_sums  the BN's backward with the statistics held fixed: this rank's T1, T2
    sync_bn_dx         the direct terms again, and the statistics' share of ∂L/∂x (and of
                       ∂L/∂input_scale, ∂L/∂mix) from the global T1, T2: ∂L/∂u += Q·u + R
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._common import acc_dtype, check_branch_values, check_mix_values, updated_running_stats
from .._eager import routing_weights
from .eager import backward, forward
from .schema import sync_apply_args

F64 = torch.float64


def _op(mix) -> str:
    return "sync_mixed_batch_norm" if mix is not None else "sync_multi_batch_norm"


def _size(x: Tensor) -> int:
    S = 1
    for d in x.shape[2:]:
        S *= d
    return S


def _bc(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(*t.shape, *([1] * (ndim - 2)))


def _where(M: Tensor, t: Tensor) -> Tensor:
    """M[n, k, None]·t with exact zeros where M is zero (a NaN sample stays out of branches it
    has no weight in)."""
    Mb = M[:, :, None]
    return torch.where(Mb != 0, Mb * t, 0.0)


def _routing(branch, mix, K, dtype) -> Tensor:
    if mix is not None:
        check_mix_values(mix, "sync_mixed_batch_norm")
    else:
        check_branch_values(branch, K, "sync_multi_batch_norm")
    return routing_weights(branch, mix, K, dtype)


def plane_sums(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each plane's centre c (its mean as rounded) and sums r = Σ(x − c), q = Σ(x − c)², fp64
    [N, C]."""
    N, C = x.shape[:2]
    xs = x.to(F64).reshape(N, C, _size(x))
    c = xs.mean(2) if xs.shape[2] else xs.sum(2)
    dev = xs - c[:, :, None]
    return c, dev.sum(2), dev.square().sum(2)


def plane_moments(x: Tensor, acc) -> tuple[Tensor, Tensor]:
    """Each plane's mean and M2 = Σ(x − mean)² ([N, C], acc)."""
    c, r, q = plane_sums(x)
    S = max(_size(x), 1)
    return (c + r / S).to(acc), (q - r * r / S).to(acc)


def merge_ranks(pay: Tensor, K: int, C: int) -> tuple[Tensor, Tensor, Tensor]:
    """The global per-(k, c) count [K], mean and biased variance [K, C] (fp64) from the
    all-reduced payload [world, K + 3·K·C], one row per rank [count K | centre K·C | R K·C |
    Q K·C]: the ranks' sums moved to one centre C0, the centre of the first rank with values of
    branch k, d = C_r − C0, R = Σ R_r + n_r·d, Q = Σ Q_r + 2·d·R_r + n_r·d², mean = C0 + R/n,
    M2 = Q − R²/n (Chan's merge, cross terms included; sync_triton.py `_global_stats` is
    its Triton twin)."""
    KC = K * C
    cnt = pay[:, :K, None]                                              # [R, K, 1]
    ctr, Rr, Qr = (pay[:, K + j * KC:K + (j + 1) * KC].reshape(-1, K, C) for j in range(3))
    n = cnt.sum(0)                                                      # [K, 1]
    nz = torch.where(n != 0, n, 1.0)
    first = (cnt[:, :, 0] != 0).to(torch.int8).argmax(0)                # [K]
    c0 = ctr.gather(0, first.view(1, K, 1).expand(1, K, C))[0]          # [K, C]
    d = torch.where(cnt != 0, ctr - c0, 0.0)
    R = (Rr + cnt * d).sum(0)
    Q = (Qr + (2 * Rr + cnt * d) * d).sum(0)
    return n[:, 0], c0 + R / nz, ((Q - R * R / nz) / nz).clamp_min(0)


def sync_bn_stats(x, branch, mix, input_scale, num_batches_tracked, num_branches, cumulative,
                  rank, world_size):
    K, C = num_branches, x.shape[1]
    acc = acc_dtype(x)
    M = _routing(branch, mix, K, F64)                                   # [N, K]
    S = _size(x)
    c, r, q = plane_sums(x)
    planes = torch.stack(plane_moments(x, acc)) if mix is not None else x.new_empty(0, dtype=acc)
    if input_scale is not None:  # u = s·x
        s = input_scale.to(F64)
        c, r, q = s * c, s * r, s * s * q
    W = M.sum(0)
    ck = _where(M, c[:, None, :]).sum(0) / torch.where(W != 0, W, 1.0)[:, None]
    d = c[:, None, :] - ck[None]                                        # [N, K, C]
    r3 = r[:, None, :]
    R = _where(M, r3 + S * d).sum(0)
    Q = _where(M, q[:, None, :] + (2 * r3 + S * d) * d).sum(0)
    payload = x.new_zeros(world_size, K + 3 * K * C, dtype=F64)
    payload[rank] = torch.cat([S * W, ck.flatten(), R.flatten(), Q.flatten()])
    old = (num_batches_tracked.to(acc) if cumulative and num_batches_tracked is not None
           else x.new_empty(0, dtype=acc))
    return payload, planes, old


def sync_bn_apply(*args):
    a, payload, _ = sync_apply_args(args)
    x, running_mean, running_var = a.x, a.running_mean, a.running_var
    num_batches_tracked = a.num_batches_tracked
    K, C = a.num_branches, x.shape[1]
    momentum, cumulative = a.momentum, a.cumulative
    acc = acc_dtype(x)
    count, mean64, var64 = merge_ranks(payload, K, C)
    # Normalize with the global statistics: the BN in its running-statistics mode.
    y, mean, invstd, *_ = forward(a._replace(
        running_mean=mean64.to(acc), running_var=var64.to(acc), num_batches_tracked=None,
        training=False, cumulative=False))
    if running_mean is not None:
        cumulative = cumulative and num_batches_tracked is not None
        rm, rv, nbt = updated_running_stats(running_mean, running_var, num_batches_tracked,
                                            mean64.to(acc), var64.to(acc), count.to(acc),
                                            momentum, cumulative)
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
            if num_batches_tracked is not None:
                num_batches_tracked.copy_(nbt)
    return y, mean.to(acc), invstd.to(acc)


def _empty(x, acc):
    return x.new_empty(0, dtype=acc)


def sync_bn_grad_sums(dy, x, branch, mix, weight, bias, mean, invstd, input_scale, film_gamma,
                      film_beta, num_branches, relu, needs):
    acc = mean.dtype
    # The BN's backward with the statistics held fixed: its dbias, dweight are T1, T2.
    grads = backward(dy, x, branch, mix, weight, bias, mean, invstd, _empty(x, acc),
                              input_scale, film_gamma, film_beta, num_branches, False, relu,
                              (False, False, True, True, False, False, False))
    T2, T1 = grads[2].to(acc), grads[3].to(acc)
    return (torch.stack([T1, T2]), _empty(x, acc), T2.clone() if needs[2] else _empty(x, acc),
            T1.clone() if needs[3] else _empty(x, acc))


def sync_bn_dx(dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale, film_gamma,
               film_beta, sums, parts, payload, num_branches, relu, needs):
    K = num_branches
    acc = mean.dtype
    need_x = bool(needs[0])
    need_mix = bool(needs[1]) and mix is not None
    need_s, need_g, need_be = (bool(n) and t is not None for n, t in zip(
        needs[4:], (input_scale, film_gamma, film_beta)))
    # The direct terms: the BN's backward with the statistics held fixed.
    dx_d, dmix_d, _w, _b, ds_d, dg, dbe = backward(
        dy, x, branch, mix, weight, bias, mean, invstd, _empty(x, acc), input_scale, film_gamma,
        film_beta, K, False, relu, (need_x or need_s, need_mix, False, False, need_s, need_g,
                                    need_be))
    T1, T2 = sums[0].to(acc), sums[1].to(acc)
    count, _, var = (t.to(acc) for t in merge_ranks(payload, K, x.shape[1]))
    M = routing_weights(branch, mix, K, acc)
    r = invstd.to(acc)
    mu = mean.to(acc)
    a = r if weight is None else r * weight.to(acc)
    m = torch.where(count != 0, count, 1.0)[:, None]                    # [K, 1]
    # ∂L/∂u += Q·u + R per plane: the statistics' share, -Σ_k M·a/m·(T1 + x̂·T2).
    Q = -_where(M, (a * r * T2 / m)[None]).sum(1)                       # [N, C]
    R = -_where(M, (a * (T1 - r * mu * T2) / m)[None]).sum(1)
    s = None if input_scale is None else input_scale.to(acc)
    S = _size(x)
    dx = dmix = ds = None
    if need_x:
        qx, rx = (Q, R) if s is None else (s * s * Q, s * R)
        nd = x.dim()
        dx = (dx_d.to(acc) + _bc(qx, nd) * x.to(acc) + _bc(rx, nd)).to(x.dtype)
    if need_s or need_mix:
        pmean, pm2 = (planes[0], planes[1]) if planes.numel() else plane_moments(x, acc)
    if need_s:  # Σ_s x·(Q·s·x + R) from the planes' Σx and Σx²
        sx, sxx = S * pmean, pm2 + S * pmean.square()
        ds = ds_d.to(acc) + Q * s * sxx + R * sx
    if need_mix:  # the statistics' share: -Σ_c a·[T1·(ū - μ) + ½·r·T2·(q - σ²)]/W
        ub = pmean if s is None else s * pmean
        q = (pm2 if s is None else s * s * pm2) / max(S, 1)
        du = ub[:, None, :] - mu[None]                                  # [N, K, C]
        W = count / max(S, 1)
        W = torch.where(W != 0, W, 1.0)[None, :, None]
        stat = (a[None] * (T1[None] * du + 0.5 * r[None] * T2[None] *
                           (q[:, None, :] + du.square() - var[None])) / W).sum(2)
        dmix = dmix_d.to(acc) - stat
    return (x.new_empty(0) if dx is None else dx, _empty(x, acc) if dmix is None else dmix,
            _empty(x, acc) if ds is None else ds, dg.to(acc) if need_g else _empty(x, acc),
            dbe.to(acc) if need_be else _empty(x, acc))


def implementations() -> dict:
    return {"sync_bn_stats": sync_bn_stats, "sync_bn_apply": sync_bn_apply,
            "sync_bn_grad_sums": sync_bn_grad_sums, "sync_bn_dx": sync_bn_dx}
