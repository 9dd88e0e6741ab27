"""Triton kernels of the sample-routed multi-branch batch norm (shared/DESIGN.md §2.1).

Every tensor is walked as [N, C, S] (S = prod(spatial)) with its own strides, so contiguous,
channels_last and batch-sliced inputs need no copy. Three kernels:

  _moments_kernel   per (sample chunk, branch, channel): count, mean, M2 — each (n, c) plane's
                    moments in registers, merged into its branch with Chan's formula
  _grad_sums_kernel per (sample chunk, branch, channel): Σdy and Σdy·(x - μ)
  _affine_kernel    out = A[k,c]·u + B[k,c]·v + D[k,c] with k = branch[n]: the forward
                    normalization (y = a·x + d) and the backward (dx = α·dy + β·x + γ)

The chunks' partials are merged into [K, C] with a few tiny torch ops; nothing syncs with the host.
Loads are cast to the accumulation type at once (fp32, fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference


@triton.jit
def _moments_kernel(x_ptr, branch_ptr, cnt_ptr, mean_ptr, m2_ptr,
                    N, C, S, sxn, sxc, sxs, n_per_prog,
                    K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    ks = tl.arange(0, K_BLOCK)
    acc_n = tl.zeros([K_BLOCK, BLOCK_C], ACC)
    acc_mean = tl.zeros([K_BLOCK, BLOCK_C], ACC)
    acc_m2 = tl.zeros([K_BLOCK, BLOCK_C], ACC)
    n0 = pid_p * n_per_prog
    for n in range(n0, tl.minimum(n0 + n_per_prog, N)):
        k = tl.load(branch_ptr + n)
        p_mean = tl.zeros([BLOCK_C], ACC)
        p_m2 = tl.zeros([BLOCK_C], ACC)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = (ss < S)[:, None] & cmask[None, :]
            v = tl.load(x_ptr + n * sxn + cs[None, :] * sxc + ss[:, None] * sxs,
                        mask=mask, other=0.0).to(ACC)
            zero = tl.zeros([BLOCK_C], ACC)
            b_n = zero + tl.minimum(S - s0, BLOCK_S)  # values in this block
            seen = zero + s0  # values of the plane merged so far
            b_mean = tl.sum(v, 0) / b_n
            d = tl.where(mask, v - b_mean[None, :], 0.0)
            delta = b_mean - p_mean
            p_mean += delta * (b_n / (seen + b_n))
            p_m2 += tl.sum(d * d, 0) + delta * delta * (seen * b_n / (seen + b_n))
        p_n = tl.zeros([1, BLOCK_C], ACC) + S
        sel = (ks == k)[:, None] & cmask[None, :]
        tot = acc_n + p_n
        delta = p_mean[None, :] - acc_mean
        acc_mean = tl.where(sel, acc_mean + delta * (p_n / tot), acc_mean)
        acc_m2 = tl.where(sel, acc_m2 + p_m2[None, :] + delta * delta * (acc_n * p_n / tot), acc_m2)
        acc_n = tl.where(sel, tot, acc_n)
    offs = pid_p * K * C + ks[:, None] * C + cs[None, :]
    omask = (ks < K)[:, None] & cmask[None, :]
    tl.store(cnt_ptr + offs, acc_n, mask=omask)
    tl.store(mean_ptr + offs, acc_mean, mask=omask)
    tl.store(m2_ptr + offs, acc_m2, mask=omask)


@triton.jit
def _grad_sums_kernel(dy_ptr, x_ptr, branch_ptr, mean_ptr, sdy_ptr, sdyx_ptr,
                      N, C, S, sdn, sdc, sds, sxn, sxc, sxs, n_per_prog,
                      K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    ks = tl.arange(0, K_BLOCK)
    acc1 = tl.zeros([K_BLOCK, BLOCK_C], ACC)
    acc2 = tl.zeros([K_BLOCK, BLOCK_C], ACC)
    n0 = pid_p * n_per_prog
    for n in range(n0, tl.minimum(n0 + n_per_prog, N)):
        k = tl.load(branch_ptr + n)
        mu = tl.load(mean_ptr + k * C + cs, mask=cmask, other=0.0)
        s1 = tl.zeros([BLOCK_C], ACC)
        s2 = tl.zeros([BLOCK_C], ACC)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = (ss < S)[:, None] & cmask[None, :]
            dy = tl.load(dy_ptr + n * sdn + cs[None, :] * sdc + ss[:, None] * sds,
                         mask=mask, other=0.0).to(ACC)
            x = tl.load(x_ptr + n * sxn + cs[None, :] * sxc + ss[:, None] * sxs,
                        mask=mask, other=0.0).to(ACC)
            s1 += tl.sum(dy, 0)
            s2 += tl.sum(dy * tl.where(mask, x - mu[None, :], 0.0), 0)
        sel = (ks == k)[:, None]
        acc1 = tl.where(sel, acc1 + s1[None, :], acc1)
        acc2 = tl.where(sel, acc2 + s2[None, :], acc2)
    offs = pid_p * K * C + ks[:, None] * C + cs[None, :]
    omask = (ks < K)[:, None] & cmask[None, :]
    tl.store(sdy_ptr + offs, acc1, mask=omask)
    tl.store(sdyx_ptr + offs, acc2, mask=omask)


@triton.jit
def _affine_kernel(u_ptr, v_ptr, out_ptr, branch_ptr, a_ptr, b_ptr, d_ptr,
                   C, S, sun, suc, sus, svn, svc, svs, son, soc, sos, c_blocks,
                   HAS_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                   ACC: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // c_blocks
    cs = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cmask = cs < C
    mask = (ss < S)[:, None] & cmask[None, :]
    k = tl.load(branch_ptr + n)
    a = tl.load(a_ptr + k * C + cs, mask=cmask, other=0.0)
    d = tl.load(d_ptr + k * C + cs, mask=cmask, other=0.0)
    u = tl.load(u_ptr + n * sun + cs[None, :] * suc + ss[:, None] * sus, mask=mask, other=0.0)
    out = a[None, :] * u.to(ACC) + d[None, :]
    if HAS_V:
        b = tl.load(b_ptr + k * C + cs, mask=cmask, other=0.0)
        v = tl.load(v_ptr + n * svn + cs[None, :] * svc + ss[:, None] * svs, mask=mask, other=0.0)
        out += b[None, :] * v.to(ACC)
    tl.store(out_ptr + n * son + cs[None, :] * soc + ss[:, None] * sos,
             out.to(out_ptr.dtype.element_ty), mask=mask)


# --- launch helpers -------------------------------------------------------------------------

def _ncs(t: torch.Tensor) -> torch.Tensor:
    """View as [N, C, S]; only a layout that no view can express is copied."""
    N, C = t.shape[0], t.shape[1]
    try:
        return t.view(N, C, -1) if t.dim() != 2 else t.unsqueeze(2)
    except RuntimeError:
        return t.reshape(N, C, -1)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(t3: torch.Tensor):
    """Tile shape: along S when planes are contiguous, along C when channels are."""
    C, S = t3.shape[1], t3.shape[2]
    if t3.stride(1) == 1 and C > 1 and t3.stride(2) != 1:
        block_c = min(64, triton.next_power_of_2(C))
        return block_c, max(1, min(triton.next_power_of_2(S), 2048 // block_c))
    return 1, min(1024, triton.next_power_of_2(max(S, 1)))


def _programs(n: int, c_blocks: int, device: torch.device) -> tuple[int, int]:
    """Sample chunks per channel block: enough programs to fill the device."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    chunks = max(1, min(n, triton.cdiv(target, c_blocks)))
    per = triton.cdiv(max(n, 1), chunks)
    return triton.cdiv(max(n, 1), per), per


def _routed_affine(u3, v3, out3, branch, a, b, d):
    N, C, S = u3.shape
    block_c, block_s = _blocks(u3)
    c_blocks = triton.cdiv(C, block_c)
    grid = (N * c_blocks, triton.cdiv(S, block_s))
    v3 = u3 if v3 is None else v3
    if N * C * S:
        _affine_kernel[grid](u3, v3, out3, branch, a, b if b is not None else a, d,
                             C, S, *u3.stride(), *v3.stride(), *out3.stride(), c_blocks,
                             HAS_V=b is not None, BLOCK_C=block_c, BLOCK_S=block_s,
                             ACC=_tl_acc(a.dtype))


def _moments(x3, branch, K, acc):
    N, C, S = x3.shape
    block_c, block_s = _blocks(x3)
    c_blocks = triton.cdiv(C, block_c)
    P, per = _programs(N, c_blocks, x3.device)
    cnt, pmean, pm2 = (torch.zeros(P, K, C, device=x3.device, dtype=acc) for _ in range(3))
    if N * C * S:
        _moments_kernel[(c_blocks, P)](x3, branch, cnt, pmean, pm2, N, C, S, *x3.stride(), per,
                                       K=K, K_BLOCK=max(2, triton.next_power_of_2(K)),
                                       BLOCK_C=block_c, BLOCK_S=block_s, ACC=_tl_acc(acc))
    # Chan's merge of the chunks: exact for any split, no Σx² cancellation.
    count = cnt.sum(0)
    mean = (cnt * pmean).sum(0) / count.clamp_min(1)
    m2 = (pm2 + cnt * (pmean - mean).square()).sum(0)
    var = m2 / count.clamp_min(1)
    return count[:, 0] if C else count.new_zeros(K), mean, var


# --- the backend entry points (same signatures as fastrobust._C and fastrobust.reference) ---

def multi_bn_forward(x, branch, weight, bias, running_mean, running_var, num_batches_tracked,
                     num_branches, training, momentum, cumulative, eps):
    reference.check_branch_values(branch, num_branches)
    K = num_branches
    acc = reference.acc_dtype(x)
    x3 = _ncs(x)
    new_running = reference.no_running_update(x)
    if training or running_mean is None:
        count, mean, var = _moments(x3, branch, K, acc)
        if training and running_mean is not None:
            new_running = reference.updated_running_stats(
                running_mean, running_var, num_batches_tracked, mean, var, count, momentum,
                cumulative)
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc)
    invstd = torch.rsqrt(var + eps)
    a = invstd if weight is None else invstd * weight.to(acc)
    d = -mean * a if bias is None else bias.to(acc) - mean * a
    y = torch.empty_like(x)
    _routed_affine(x3, None, _ncs(y), branch, a.contiguous(), None, d.contiguous())
    return (y, mean, invstd, *new_running)


def multi_bn_backward(dy, x, branch, weight, mean, invstd, num_branches, batch_stats,
                      need_param_grads):
    K, C = mean.shape
    acc = mean.dtype
    x3, dy3 = _ncs(x), _ncs(dy)
    N, _, S = x3.shape
    w = torch.ones_like(invstd) if weight is None else weight.to(acc)
    if batch_stats or need_param_grads:
        block_c, block_s = _blocks(x3)
        c_blocks = triton.cdiv(C, block_c)
        P, per = _programs(N, c_blocks, x.device)
        psdy, psdyx = (torch.zeros(P, K, C, device=x.device, dtype=acc) for _ in range(2))
        if N * C * S:
            _grad_sums_kernel[(c_blocks, P)](dy3, x3, branch, mean.contiguous(), psdy, psdyx,
                                             N, C, S, *dy3.stride(), *x3.stride(), per,
                                             K=K, K_BLOCK=max(2, triton.next_power_of_2(K)),
                                             BLOCK_C=block_c, BLOCK_S=block_s,
                                             ACC=_tl_acc(acc))
        sdy, sdyx = psdy.sum(0), psdyx.sum(0)
    alpha = w * invstd
    if batch_stats:
        counts = torch.zeros(K, device=x.device, dtype=acc).index_add_(
            0, branch, torch.ones_like(branch, dtype=acc))
        m = (counts * S).clamp_min(1)[:, None]
        # dx = w·r·(dy - Σdy/m - x̂·Σ(dy·x̂)/m) written as α·dy + β·x + γ.
        beta = -alpha * invstd.square() * sdyx / m
        gamma = -alpha * sdy / m - beta * mean
    else:
        beta, gamma = None, torch.zeros_like(alpha)
    dx = torch.empty_like(x)
    _routed_affine(dy3, x3 if batch_stats else None, _ncs(dx), branch, alpha.contiguous(),
                   None if beta is None else beta.contiguous(), gamma.contiguous())
    if need_param_grads:
        return dx, sdyx * invstd, sdy
    return dx, x.new_empty((0, C), dtype=acc), x.new_empty((0, C), dtype=acc)
