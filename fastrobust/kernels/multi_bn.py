"""Triton kernels of the per-sample affine family: routed BN, mixed BN, their fused extras
(input scale, FiLM, ReLU) and FiLM / channel scale (shared/DESIGN.md §2.1-2.4).

These are the passes over the activation ("leaves") of `fastrobust._engine.Engine`, which does
the tiny per-(sample, branch, channel) math between them with torch ops on [N, K, C] tensors
(no host sync). Every tensor is walked as [N, C, S] (S = prod(spatial)) with its own strides,
so contiguous, channels_last and batch-sliced tensors need no copy. Four kernels:

  _plane_moments_kernel    per plane (n, c): mean and M2 = Σ(x - mean)² (blocks merged with
                           Chan's formula: no Σx² cancellation)
  _plane_grad_sums_kernel  per plane: Σg and Σg·(x - centre), g = dy masked by the ReLU, whose
                           pre-activation A·x + D is recomputed from x
  _affine_kernel           y = act(A[n,c]·x + D[n,c])
  _backward_kernel         v = P·g + Q·x + R, dx = scale·v, and per-block Σx·v (the input
                           scale's gradient), reduced with torch afterwards (deterministic)

Loads are cast to the accumulation type at once (fp32, fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._engine import Engine


@triton.jit
def _plane_moments_kernel(x_ptr, mean_ptr, m2_ptr, C, S, sxn, sxc, sxs,
                          BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    n = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    p_mean = tl.zeros([BLOCK_C], ACC)
    p_m2 = tl.zeros([BLOCK_C], ACC)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        mask = (ss < S)[:, None] & cmask[None, :]
        v = tl.load(x_ptr + n * sxn + cs[None, :] * sxc + ss[:, None] * sxs,
                    mask=mask, other=0.0).to(ACC)
        zero = tl.zeros([BLOCK_C], ACC)
        b_n = zero + tl.minimum(S - s0, BLOCK_S)  # values in this block
        seen = zero + s0  # values merged so far
        b_mean = tl.sum(v, 0) / b_n
        d = tl.where(mask, v - b_mean[None, :], 0.0)
        delta = b_mean - p_mean
        p_mean += delta * (b_n / (seen + b_n))
        p_m2 += tl.sum(d * d, 0) + delta * delta * (seen * b_n / (seen + b_n))
    tl.store(mean_ptr + n * C + cs, p_mean, mask=cmask)
    tl.store(m2_ptr + n * C + cs, p_m2, mask=cmask)


@triton.jit
def _plane_grad_sums_kernel(dy_ptr, x_ptr, center_ptr, ma_ptr, md_ptr, s1_ptr, s2_ptr,
                            C, S, sdn, sdc, sds, sxn, sxc, sxs,
                            MASK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                            ACC: tl.constexpr):
    n = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    ctr = tl.load(center_ptr + n * C + cs, mask=cmask, other=0.0)
    if MASK:
        ma = tl.load(ma_ptr + n * C + cs, mask=cmask, other=0.0)
        md = tl.load(md_ptr + n * C + cs, mask=cmask, other=0.0)
    s1 = tl.zeros([BLOCK_C], ACC)
    s2 = tl.zeros([BLOCK_C], ACC)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        mask = (ss < S)[:, None] & cmask[None, :]
        g = tl.load(dy_ptr + n * sdn + cs[None, :] * sdc + ss[:, None] * sds,
                    mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + n * sxn + cs[None, :] * sxc + ss[:, None] * sxs,
                    mask=mask, other=0.0).to(ACC)
        if MASK:
            g = tl.where(ma[None, :] * x + md[None, :] <= 0, 0.0, g)
        s1 += tl.sum(g, 0)
        s2 += tl.sum(g * tl.where(mask, x - ctr[None, :], 0.0), 0)
    tl.store(s1_ptr + n * C + cs, s1, mask=cmask)
    tl.store(s2_ptr + n * C + cs, s2, mask=cmask)


@triton.jit
def _affine_kernel(x_ptr, out_ptr, a_ptr, d_ptr, C, S, sxn, sxc, sxs, son, soc, sos, c_blocks,
                   RELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                   ACC: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // c_blocks
    cs = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cmask = cs < C
    mask = (ss < S)[:, None] & cmask[None, :]
    a = tl.load(a_ptr + n * C + cs, mask=cmask, other=0.0)
    d = tl.load(d_ptr + n * C + cs, mask=cmask, other=0.0)
    x = tl.load(x_ptr + n * sxn + cs[None, :] * sxc + ss[:, None] * sxs, mask=mask, other=0.0)
    f = a[None, :] * x.to(ACC) + d[None, :]
    if RELU:
        f = tl.where(f <= 0, 0.0, f)
    tl.store(out_ptr + n * son + cs[None, :] * soc + ss[:, None] * sos,
             f.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(dy_ptr, x_ptr, out_ptr, p_ptr, q_ptr, r_ptr, sc_ptr, ma_ptr, md_ptr,
                     dot_ptr, N, C, S, sdn, sdc, sds, sxn, sxc, sxs, son, soc, sos, c_blocks,
                     HAS_Q: tl.constexpr, MASK: tl.constexpr, SCALE: tl.constexpr,
                     DOT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                     ACC: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // c_blocks
    cs = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    sb = tl.program_id(1)
    ss = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    cmask = cs < C
    mask = (ss < S)[:, None] & cmask[None, :]
    pc = n * C + cs
    g = tl.load(dy_ptr + n * sdn + cs[None, :] * sdc + ss[:, None] * sds,
                mask=mask, other=0.0).to(ACC)
    if HAS_Q or MASK or DOT:
        x = tl.load(x_ptr + n * sxn + cs[None, :] * sxc + ss[:, None] * sxs,
                    mask=mask, other=0.0).to(ACC)
    if MASK:
        ma = tl.load(ma_ptr + pc, mask=cmask, other=0.0)
        md = tl.load(md_ptr + pc, mask=cmask, other=0.0)
        g = tl.where(ma[None, :] * x + md[None, :] <= 0, 0.0, g)
    v = tl.load(p_ptr + pc, mask=cmask, other=0.0)[None, :] * g \
        + tl.load(r_ptr + pc, mask=cmask, other=0.0)[None, :]
    if HAS_Q:
        v += tl.load(q_ptr + pc, mask=cmask, other=0.0)[None, :] * x
    if DOT:
        tl.store(dot_ptr + sb * N * C + pc, tl.sum(tl.where(mask, x * v, 0.0), 0), mask=cmask)
    if SCALE:
        v = v * tl.load(sc_ptr + pc, mask=cmask, other=0.0)[None, :]
    tl.store(out_ptr + n * son + cs[None, :] * soc + ss[:, None] * sos,
             v.to(out_ptr.dtype.element_ty), mask=mask)


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


def _blocks(t3: torch.Tensor, reduce: bool):
    """Tile shape: along S when planes are contiguous, along C when channels are."""
    C, S = t3.shape[1], t3.shape[2]
    if t3.stride(1) == 1 and C > 1 and t3.stride(2) != 1:
        block_c = min(64, triton.next_power_of_2(C))
        return block_c, max(1, min(triton.next_power_of_2(S), 2048 // block_c))
    return 1, min(1024 if reduce else 2048, triton.next_power_of_2(max(S, 1)))


def _like(x: torch.Tensor) -> torch.Tensor:
    """An output shaped and laid out like x (dense)."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


class TritonLeaves:
    """The passes over the activation, as Triton kernels (see the module docstring)."""

    @staticmethod
    def plane_moments(x, acc):
        x3 = _ncs(x)
        N, C, S = x3.shape
        mean = torch.zeros(N, C, device=x.device, dtype=acc)
        m2 = torch.zeros(N, C, device=x.device, dtype=acc)
        if N * C * S:
            block_c, block_s = _blocks(x3, True)
            _plane_moments_kernel[(N, triton.cdiv(C, block_c))](
                x3, mean, m2, C, S, *x3.stride(), BLOCK_C=block_c, BLOCK_S=block_s,
                ACC=_tl_acc(acc))
        return mean, m2

    @staticmethod
    def grad_sums(dy, x, center, mask, acc):
        x3, dy3 = _ncs(x), _ncs(dy)
        N, C, S = x3.shape
        s1 = torch.zeros(N, C, device=x.device, dtype=acc)
        s2 = torch.zeros(N, C, device=x.device, dtype=acc)
        if N * C * S:
            ma, md = (center, center) if mask is None else (mask[0].contiguous(),
                                                            mask[1].contiguous())
            block_c, block_s = _blocks(x3, True)
            _plane_grad_sums_kernel[(N, triton.cdiv(C, block_c))](
                dy3, x3, center.contiguous(), ma, md, s1, s2, C, S, *dy3.stride(),
                *x3.stride(), MASK=mask is not None, BLOCK_C=block_c, BLOCK_S=block_s,
                ACC=_tl_acc(acc))
        return s1, s2

    @staticmethod
    def affine(x, A, D, relu):
        y = _like(x)
        x3, y3 = _ncs(x), _ncs(y)
        N, C, S = x3.shape
        if N * C * S:
            block_c, block_s = _blocks(x3, False)
            c_blocks = triton.cdiv(C, block_c)
            _affine_kernel[(N * c_blocks, triton.cdiv(S, block_s))](
                x3, y3, A.contiguous(), D.contiguous(), C, S, *x3.stride(), *y3.stride(),
                c_blocks, RELU=relu, BLOCK_C=block_c, BLOCK_S=block_s, ACC=_tl_acc(A.dtype))
        return y

    @staticmethod
    def backward_affine(dy, x, P, Q, R, out_scale, mask, want_dot, acc):
        dx = _like(x)
        x3, dy3, dx3 = _ncs(x), _ncs(dy), _ncs(dx)
        N, C, S = x3.shape
        block_c, block_s = _blocks(x3, False)
        c_blocks = triton.cdiv(C, block_c)
        s_blocks = triton.cdiv(S, block_s)
        dot = torch.zeros(s_blocks if want_dot else 0, N, C, device=x.device, dtype=acc)
        if N * C * S:
            P = P.contiguous()
            ma, md = (P, P) if mask is None else (mask[0].contiguous(), mask[1].contiguous())
            _backward_kernel[(N * c_blocks, s_blocks)](
                dy3, x3, dx3, P, P if Q is None else Q.contiguous(), R.contiguous(),
                P if out_scale is None else out_scale.contiguous(), ma, md,
                dot if want_dot else P, N, C, S, *dy3.stride(), *x3.stride(), *dx3.stride(),
                c_blocks, HAS_Q=Q is not None, MASK=mask is not None,
                SCALE=out_scale is not None, DOT=want_dot, BLOCK_C=block_c, BLOCK_S=block_s,
                ACC=_tl_acc(acc))
        return dx, (dot.sum(0) if want_dot else None)


engine = Engine(TritonLeaves())
bn_forward = engine.bn_forward
bn_backward = engine.bn_backward
film_forward = engine.film_forward
film_backward = engine.film_backward
