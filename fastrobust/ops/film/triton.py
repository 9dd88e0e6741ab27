"""Triton kernels of FiLM and channel scale, y = γ[n,c]·x + β[n,c] with [N, C] or [C] γ, β
(docs/math.md): one launch forward, at most two backward.

  forward   batch_norm/triton.py's _affine_kernel ([C] γ, β read through stride-0 views, never copied)
  backward  _film_grad_kernel (dx = γ·dy and the per-plane Σdy·x, Σdy in one pass) and, when
            a plane is split over S or γ / β is [C], _film_reduce_kernel (the partials summed
            over the splits and, for [C], over the batch)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import acc_dtype
from .._triton import on_device
from .._triton.plan import launch
from .._triton.tiles import (_blocks, _like, _ncs, _plane_split, _splits, _sum_parts, _tile, _tl_acc,
                      _zero)
from ..batch_norm.triton import _affine


@triton.jit
def _film_grad_kernel(dy_ptr, x_ptr, dx_ptr, g_ptr, sgn, sgc, pg_ptr, pb_ptr, N, C, S, CHUNK,
                      c_blocks, sdn, sdc, sds, sxn, sxc, sxs, son, soc, sos,
                      DX: tl.constexpr, GAMMA: tl.constexpr, SUM_G: tl.constexpr,
                      SUM_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                      ACC: tl.constexpr):
    """Per (plane block, split t), over its chunk of S: dx = γ·dy (DX) and the partial sums
    Σdy·x (SUM_G, at pg[t, n, c]) and Σdy (SUM_B, at pb[t, n, c])."""
    n, cs, cmask, t, T, start, end = _plane_split(c_blocks, C, S, CHUNK, BLOCK_C)
    g = tl.full([BLOCK_C], 1.0, ACC)
    if GAMMA:
        g = tl.load(g_ptr + n * sgn + cs.to(tl.int64) * sgc, mask=cmask, other=0.0).to(ACC)
    sg = tl.zeros([BLOCK_C], ACC)
    sb = tl.zeros([BLOCK_C], ACC)
    for s0 in range(start, end, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        mask = (ss < end)[:, None] & cmask[None, :]
        d = tl.load(dy_ptr + _tile(n, cs, ss, sdn, sdc, sds), mask=mask, other=0.0).to(ACC)
        if DX:
            tl.store(dx_ptr + _tile(n, cs, ss, son, soc, sos),
                     (d * g[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        if SUM_G:
            x = tl.load(x_ptr + _tile(n, cs, ss, sxn, sxc, sxs), mask=mask, other=0.0).to(ACC)
            sg += tl.sum(d * x, 0)
        if SUM_B:
            sb += tl.sum(d, 0)
    off = t * N * C + n * C + cs
    if SUM_G:
        tl.store(pg_ptr + off, sg, mask=cmask)
    if SUM_B:
        tl.store(pb_ptr + off, sb, mask=cmask)


@triton.jit
def _split_sums(parts_ptr, j, ns, cs, N, C, T, acc, out_ptrs, m, PER_CHANNEL: tl.constexpr):
    """Samples ns of partials j summed over the splits: added to acc (per-channel results,
    returned) or stored at out_ptrs (per-sample)."""
    tot = _sum_parts(parts_ptr, j, ns, cs, N, C, T)
    if PER_CHANNEL:
        acc += tot
    else:
        tl.store(out_ptrs, tot, mask=m)
    return acc


@triton.jit
def _film_reduce_kernel(parts_ptr, dg_ptr, db_ptr, N, C, T, SUM_G: tl.constexpr,
                        SUM_B: tl.constexpr, PC_G: tl.constexpr, PC_B: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Per channel block: the partials parts[0 (γ) / 1 (β), T, N, C] summed over the splits
    (and over the batch for a per-channel result, PC_*) into dγ, dβ ([C] or [N, C])."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    acc_g = tl.zeros([BLOCK_N, BLOCK_C], ACC)  # per-channel results: one row sum at the end
    acc_b = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    for n0 in range(0, N, BLOCK_N):
        ns = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        m = (ns < N)[:, None] & cmask[None, :]
        off = ns[:, None] * C + cs[None, :]
        if SUM_G:
            acc_g = _split_sums(parts_ptr, 0, ns, cs, N, C, T, acc_g, dg_ptr + off, m, PC_G)
        if SUM_B:
            acc_b = _split_sums(parts_ptr, 1, ns, cs, N, C, T, acc_b, db_ptr + off, m, PC_B)
    if SUM_G and PC_G:
        tl.store(dg_ptr + cs, tl.sum(acc_g, 0), mask=cmask)
    if SUM_B and PC_B:
        tl.store(db_ptr + cs, tl.sum(acc_b, 0), mask=cmask)


def _film_coefficient(t, N, C):
    """A [C] γ or β as a stride-0 [N, C] view (no copy); an [N, C] one as is."""
    return None if t is None else (t.expand(N, C) if t.dim() == 1 else t)


@torch.no_grad()
def film(x, gamma, beta):
    """y = γ·x + β with [N, C] or [C] γ, β (either may be None), cast in the kernel."""
    N, C = x.shape[:2]
    y = _like(x)
    with on_device(x):
        _affine(_ncs(x), _ncs(y), _film_coefficient(gamma, N, C),
                _film_coefficient(beta, N, C), False)
    return y


@torch.no_grad()
def film_backward(dy, x, gamma, needs, per_channel):
    """Returns (dx, dgamma, dbeta); an unneeded one is empty. dgamma (dbeta) is [C] when
    per_channel_gamma (per_channel_beta), else [N, C]. One launch writes dx and the per-plane
    sums: straight into [N, C] results when each plane is one split, else as partials that a
    second, small launch sums (over the splits of S, and over the batch for a [C] result)."""
    need_x, need_gamma, need_beta = needs
    per_channel_gamma, per_channel_beta = per_channel
    acc = acc_dtype(x)
    N, C = x.shape[:2]
    dx = torch.empty_like(x, memory_format=torch.preserve_format) if need_x else x.new_empty(0)
    g = _film_coefficient(gamma, N, C)
    pc = (per_channel_gamma and need_gamma, per_channel_beta and need_beta)
    dgamma, dbeta = (torch.empty(((C,) if p else (N, C)) if need else (0,), device=x.device,
                                 dtype=acc) for need, p in ((need_gamma, pc[0]),
                                                            (need_beta, pc[1])))
    if not (need_gamma or need_beta):
        if need_x:
            with on_device(x):
                _affine(_ncs(dy), _ncs(dx), g, None, False)
        return dx, dgamma, dbeta
    x3, dy3 = _ncs(x), _ncs(dy)
    dx3 = _ncs(dx) if need_x else dy3
    S = x3.shape[2]
    if N * C * S == 0:
        with on_device(x):
            _zero(dgamma, dbeta)
        return dx, dgamma, dbeta
    block_c, block_s = _blocks(x3, True)
    c_blocks = triton.cdiv(C, block_c)
    T, chunk = _splits(N, c_blocks, S, block_s)
    direct = T == 1 and not (pc[0] or pc[1])
    if direct:
        pg, pb = dgamma, dbeta
    else:
        parts = torch.empty(2, T, N, C, device=x.device, dtype=acc)
        pg, pb = parts[0], parts[1]
    with on_device(x):
        launch(_film_grad_kernel, (N * c_blocks, T), dy3, x3, dx3, x3 if g is None else g,
               *((0, 0) if g is None else g.stride()), pg, pb, N, C, S, chunk, c_blocks,
               *dy3.stride(), *x3.stride(), *dx3.stride(), DX=need_x, GAMMA=g is not None,
               SUM_G=need_gamma, SUM_B=need_beta, BLOCK_C=block_c, BLOCK_S=block_s,
               ACC=_tl_acc(acc))
        if not direct:
            rc = min(64, triton.next_power_of_2(C))
            rn = max(1, min(triton.next_power_of_2(N), 512 // rc))
            launch(_film_reduce_kernel, (triton.cdiv(C, rc),), parts, dgamma, dbeta, N, C, T,
                   SUM_G=need_gamma, SUM_B=need_beta, PC_G=pc[0], PC_B=pc[1], BLOCK_N=rn,
                   BLOCK_C=rc, ACC=_tl_acc(acc))
    return dx, dgamma, dbeta
