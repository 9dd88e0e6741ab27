"""Triton kernels of the PGD steps (docs/math.md).

Every tensor has x_adv's shape and its own strides: the launcher (`_geometry`) takes the
sample's dims in x_adv's memory order, merges adjacent dims where every tensor allows it, and
passes each tensor's strides over at most three dims (a layout all tensors share, contiguous
or channels_last, is one dim of stride 1; views, slices and mixed layouts are read and written
where they lie, with no copy). Only a sample whose dims merge into no three is copied (the
plan then says why it is not replayed). Three kernels:

  _linf_kernel    grid (N, ⌈S/BLOCK⌉): the elementwise linf step, in torchattacks' order of
                  operations (bitwise equal to it in fp32), or the random start (SIGN=False)
  _l2_kernel      grid (N,): one program per sample: Σg², then Σδ², then the update (the
                  sample's second and third reads mostly hit cache)
  _mifgsm_kernel  grid (N,): Σ|g|, then momentum and the linf step with sign(momentum)

With fewer samples than MIN_PROGRAMS (a GPU has 100+ SMs; 8 samples would use 8), or samples
of more than MAX_CHUNK_BLOCKS blocks (a 224² image: one program would read 147 blocks three
times), l2 and MI-FGSM split each sample into T chunks instead, in two launches:
_sample_sums_kernel (grid (N, T): the chunk's partial sums) and _l2_split_kernel /
_mifgsm_split_kernel (grid (N, T): each program adds up its sample's T partials, in order, and
updates its chunk). The split l2 gets ‖δ‖² = Σd² + 2·step·Σd·g + step²·Σg² (d = x_adv − x_nat)
from the same pass as Σg²; for a PGD iterate inside the ball (‖d‖ ≤ ε) with step α its rounding
error is ~2^-24·(ε² + α²), as small as the direct sum's against ε² where the projection is
decided.

Loads are cast to the accumulation type at once (fp32, fp64 for fp64 inputs). Scalars reach
the kernels as arguments, each as three fp32 parts whose fp64 sum is exact (fp64 inputs use
all three), so fp64 keeps full precision with nothing written from the host. No allocation
(but the split forms' partial sums), no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import PgdMode, acc_dtype

from .._triton import on_device, tiles_grid
from .._triton.plan import active, fp32_parts, launch
from .._triton.tiles import _scalar, no_overlap
from .schema import init_args, step_mode


@triton.jit
def _scalars(n, eps_ptr, alpha_ptr, eps, eps_m, eps_l, alpha, alpha_m, alpha_l, lo, lo_m, lo_l, hi,
             hi_m, hi_l, EPS_T: tl.constexpr, ALPHA_T: tl.constexpr, ACC: tl.constexpr):
    """eps, alpha (per sample or scalar) and the clip bounds of sample n, in ACC."""
    if EPS_T:
        e = tl.load(eps_ptr + n).to(ACC)
    else:
        e = _scalar(eps, eps_m, eps_l, ACC)
    if ALPHA_T:
        a = tl.load(alpha_ptr + n).to(ACC)
    else:
        a = _scalar(alpha, alpha_m, alpha_l, ACC)
    return e, a, _scalar(lo, lo_m, lo_l, ACC), _scalar(hi, hi_m, hi_l, ACC)


@triton.jit
def _clamp(v, lo, hi):
    # torch.clamp's order: max first, then min; a NaN passes through
    v = tl.where(v < lo, lo, v)
    return tl.where(v > hi, hi, v)


@triton.jit
def _sign(v):
    # torch.sign: -1, 0 or 1 (0 for NaN)
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0)).to(v.dtype)


@triton.jit
def _poison(r, e, EPS_T: tl.constexpr):
    # A negative or NaN per-sample eps is an error that the device cannot raise without a
    # host sync: the sample comes out NaN instead of silently wrong (CPU tensors raise at
    # once, csrc/checks.h). (A NaN eps compares false both ways: `e < 0` let it through.)
    if EPS_T:
        r = tl.where(e >= 0, r, float("nan"))
    return r


@triton.jit
def _at(ptr, n, s, sn, s1, s2, s3, D2, D3):
    """Address of element s of sample n. s numbers the sample's elements in the launcher's
    order of its dims (`_geometry`: sizes D1, D2, D3, the last fastest); each tensor has its
    own strides (sn for the sample). Sizes and strides equal to 1 are compiled in: a dense
    layout that all tensors share is one dim of stride 1, and its offset is n·sn + s."""
    i3 = s % D3
    r = s // D3
    return ptr + (n * sn + (r // D2).to(tl.int64) * s1 + (r % D2).to(tl.int64) * s2
                  + i3.to(tl.int64) * s3)


@triton.jit
def _linf_kernel(out_ptr, xa_ptr, g_ptr, xn_ptr, eps_ptr, alpha_ptr, eps, eps_m, eps_l, alpha,
                 alpha_m, alpha_l, lo, lo_m, lo_l, hi, hi_m, hi_l, S, s_blocks, D2, D3, so_n,
                 so_1, so_2, so_3, sa_n, sa_1, sa_2, sa_3, sg_n, sg_1, sg_2, sg_3, sx_n, sx_1,
                 sx_2, sx_3, EPS_T: tl.constexpr, ALPHA_T: tl.constexpr, SIGN: tl.constexpr,
                 BLOCK: tl.constexpr, ACC: tl.constexpr):
    # (sample, block) on grid axis x alone, the block fastest: axis y takes only 65,535
    pid = tl.program_id(0)
    n = (pid // s_blocks).to(tl.int64)
    offs = (pid % s_blocks) * BLOCK + tl.arange(0, BLOCK)
    m = offs < S
    e, a, lo_, hi_ = _scalars(n, eps_ptr, alpha_ptr, eps, eps_m, eps_l, alpha, alpha_m, alpha_l, lo,
                              lo_m, lo_l, hi, hi_m, hi_l, EPS_T, ALPHA_T, ACC)
    xa = tl.load(_at(xa_ptr, n, offs, sa_n, sa_1, sa_2, sa_3, D2, D3), mask=m, other=0.0).to(ACC)
    g = tl.load(_at(g_ptr, n, offs, sg_n, sg_1, sg_2, sg_3, D2, D3), mask=m, other=0.0).to(ACC)
    xn = tl.load(_at(xn_ptr, n, offs, sx_n, sx_1, sx_2, sx_3, D2, D3), mask=m, other=0.0).to(ACC)
    if SIGN:
        g = _sign(g)
    adv = xa + a * g  # a·sign(g) is exact, so a fused multiply-add gives the same sum
    delta = _clamp(adv - xn, -e, e)
    r = _poison(_clamp(xn + delta, lo_, hi_), e, EPS_T)
    tl.store(_at(out_ptr, n, offs, so_n, so_1, so_2, so_3, D2, D3), r.to(out_ptr.dtype.element_ty),
             mask=m)


@triton.jit
def _l2_apply(out_ptr, xa_ptr, g_ptr, xn_ptr, n, start, end, step, f, e, lo_, hi_, D2, D3, so_n,
              so_1, so_2, so_3, sa_n, sa_1, sa_2, sa_3, sg_n, sg_1, sg_2, sg_3, sx_n, sx_1, sx_2,
              sx_3, EPS_T: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """out = clamp(x_nat + f·(x_adv + step·g − x_nat)) over [start, end) of sample n."""
    for s0 in range(start, end, BLOCK):
        o = s0 + tl.arange(0, BLOCK)
        m = o < end
        xn = tl.load(_at(xn_ptr, n, o, sx_n, sx_1, sx_2, sx_3, D2, D3), mask=m,
                     other=0.0).to(ACC)
        d = (tl.load(_at(xa_ptr, n, o, sa_n, sa_1, sa_2, sa_3, D2, D3), mask=m,
                     other=0.0).to(ACC)
             + step * tl.load(_at(g_ptr, n, o, sg_n, sg_1, sg_2, sg_3, D2, D3), mask=m,
                              other=0.0).to(ACC) - xn)
        r = _poison(_clamp(xn + d * f, lo_, hi_), e, EPS_T)
        tl.store(_at(out_ptr, n, o, so_n, so_1, so_2, so_3, D2, D3),
                 r.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _l2_kernel(out_ptr, xa_ptr, g_ptr, xn_ptr, eps_ptr, alpha_ptr, eps, eps_m, eps_l, alpha,
               alpha_m, alpha_l, lo, lo_m, lo_l, hi, hi_m, hi_l, S, D2, D3, so_n, so_1, so_2,
               so_3, sa_n, sa_1, sa_2, sa_3, sg_n, sg_1, sg_2, sg_3, sx_n, sx_1, sx_2, sx_3,
               EPS_T: tl.constexpr, ALPHA_T: tl.constexpr, BLOCK: tl.constexpr,
               ACC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    e, a, lo_, hi_ = _scalars(n, eps_ptr, alpha_ptr, eps, eps_m, eps_l, alpha, alpha_m, alpha_l, lo,
                              lo_m, lo_l, hi, hi_m, hi_l, EPS_T, ALPHA_T, ACC)
    acc = tl.zeros([BLOCK], ACC)
    for s0 in range(0, S, BLOCK):
        o = s0 + tl.arange(0, BLOCK)
        g = tl.load(_at(g_ptr, n, o, sg_n, sg_1, sg_2, sg_3, D2, D3), mask=o < S,
                    other=0.0).to(ACC)
        acc += g * g
    step = a / tl.maximum(tl.sqrt(tl.sum(acc, 0)), 1e-12)
    acc = tl.zeros([BLOCK], ACC)
    for s0 in range(0, S, BLOCK):
        o = s0 + tl.arange(0, BLOCK)
        m = o < S
        d = (tl.load(_at(xa_ptr, n, o, sa_n, sa_1, sa_2, sa_3, D2, D3), mask=m,
                     other=0.0).to(ACC)
             + step * tl.load(_at(g_ptr, n, o, sg_n, sg_1, sg_2, sg_3, D2, D3), mask=m,
                              other=0.0).to(ACC)
             - tl.load(_at(xn_ptr, n, o, sx_n, sx_1, sx_2, sx_3, D2, D3), mask=m,
                       other=0.0).to(ACC))
        acc += d * d
    dn = tl.sqrt(tl.sum(acc, 0))
    f = tl.where(dn > e, e / tl.maximum(dn, 1e-30), 1.0)
    _l2_apply(out_ptr, xa_ptr, g_ptr, xn_ptr, n, 0, S, step, f, e, lo_, hi_, D2, D3, so_n, so_1,
              so_2, so_3, sa_n, sa_1, sa_2, sa_3, sg_n, sg_1, sg_2, sg_3, sx_n, sx_1, sx_2, sx_3,
              EPS_T, BLOCK, ACC)


@triton.jit
def _mifgsm_apply(xa_ptr, g_ptr, buf_ptr, xn_ptr, n, start, end, div, dec, e, a, lo_, hi_, D2,
                  D3, sa_n, sa_1, sa_2, sa_3, sg_n, sg_1, sg_2, sg_3, sb_n, sb_1, sb_2, sb_3,
                  sx_n, sx_1, sx_2, sx_3, EPS_T: tl.constexpr, BLOCK: tl.constexpr,
                  ACC: tl.constexpr):
    """buf = g/div + dec·buf, then the linf step with sign(buf), over [start, end)."""
    for s0 in range(start, end, BLOCK):
        o = s0 + tl.arange(0, BLOCK)
        m = o < end
        g = tl.load(_at(g_ptr, n, o, sg_n, sg_1, sg_2, sg_3, D2, D3), mask=m,
                    other=0.0).to(ACC)
        pb = _at(buf_ptr, n, o, sb_n, sb_1, sb_2, sb_3, D2, D3)
        b = tl.load(pb, mask=m, other=0.0).to(ACC)
        b = g / div + b * dec
        tl.store(pb, b.to(buf_ptr.dtype.element_ty), mask=m)
        pa = _at(xa_ptr, n, o, sa_n, sa_1, sa_2, sa_3, D2, D3)
        xa = tl.load(pa, mask=m, other=0.0).to(ACC)
        xn = tl.load(_at(xn_ptr, n, o, sx_n, sx_1, sx_2, sx_3, D2, D3), mask=m,
                     other=0.0).to(ACC)
        delta = _clamp(xa + a * _sign(b) - xn, -e, e)
        r = _poison(_clamp(xn + delta, lo_, hi_), e, EPS_T)
        tl.store(pa, r.to(xa_ptr.dtype.element_ty), mask=m)


@triton.jit
def _decay(decay, decay_m, decay_l, ACC: tl.constexpr):
    return _scalar(decay, decay_m, decay_l, ACC)


@triton.jit
def _mifgsm_kernel(xa_ptr, g_ptr, buf_ptr, xn_ptr, eps_ptr, alpha_ptr, eps, eps_m, eps_l, alpha,
                   alpha_m, alpha_l, lo, lo_m, lo_l, hi, hi_m, hi_l, decay, decay_m, decay_l, S,
                   D2, D3, sa_n, sa_1, sa_2, sa_3, sg_n, sg_1, sg_2, sg_3, sb_n, sb_1, sb_2, sb_3,
                   sx_n, sx_1, sx_2, sx_3, EPS_T: tl.constexpr, ALPHA_T: tl.constexpr,
                   BLOCK: tl.constexpr, ACC: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    e, a, lo_, hi_ = _scalars(n, eps_ptr, alpha_ptr, eps, eps_m, eps_l, alpha, alpha_m, alpha_l, lo,
                              lo_m, lo_l, hi, hi_m, hi_l, EPS_T, ALPHA_T, ACC)
    dec = _decay(decay, decay_m, decay_l, ACC)
    acc = tl.zeros([BLOCK], ACC)
    for s0 in range(0, S, BLOCK):
        o = s0 + tl.arange(0, BLOCK)
        acc += tl.abs(tl.load(_at(g_ptr, n, o, sg_n, sg_1, sg_2, sg_3, D2, D3), mask=o < S,
                              other=0.0).to(ACC))
    mean = tl.sum(acc, 0) / S
    div = tl.where(mean == 0, 1.0, mean)  # all-zero gradient: adds 0; a NaN spreads
    _mifgsm_apply(xa_ptr, g_ptr, buf_ptr, xn_ptr, n, 0, S, div, dec, e, a, lo_, hi_, D2, D3,
                  sa_n, sa_1, sa_2, sa_3, sg_n, sg_1, sg_2, sg_3, sb_n, sb_1, sb_2, sb_3, sx_n,
                  sx_1, sx_2, sx_3, EPS_T, BLOCK, ACC)


# --- the split forms (few or large samples) ------------------------------------------------

@triton.jit
def _sample_sums_kernel(xa_ptr, g_ptr, xn_ptr, parts_ptr, N, S, CHUNK, D2, D3, sa_n, sa_1, sa_2,
                        sa_3, sg_n, sg_1, sg_2, sg_3, sx_n, sx_1, sx_2, sx_3, L2: tl.constexpr,
                        BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Partial sums of chunk t of sample n into parts [3, T, N]: l2 Σg², Σd·g, Σd²
    (d = x_adv − x_nat); MI-FGSM Σ|g| (row 0)."""
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    T = tl.num_programs(1)
    start = t * CHUNK
    end = tl.minimum(start + CHUNK, S)
    a1 = tl.zeros([BLOCK], ACC)
    a2 = tl.zeros([BLOCK], ACC)
    a3 = tl.zeros([BLOCK], ACC)
    for s0 in range(start, end, BLOCK):
        o = s0 + tl.arange(0, BLOCK)
        m = o < end
        g = tl.load(_at(g_ptr, n, o, sg_n, sg_1, sg_2, sg_3, D2, D3), mask=m,
                    other=0.0).to(ACC)
        if L2:
            d = (tl.load(_at(xa_ptr, n, o, sa_n, sa_1, sa_2, sa_3, D2, D3), mask=m,
                         other=0.0).to(ACC)
                 - tl.load(_at(xn_ptr, n, o, sx_n, sx_1, sx_2, sx_3, D2, D3), mask=m,
                           other=0.0).to(ACC))
            a1 += g * g
            a2 += g * d
            a3 += d * d
        else:
            a1 += tl.abs(g)
    tl.store(parts_ptr + t * N + n, tl.sum(a1, 0))
    if L2:
        tl.store(parts_ptr + (T + t) * N + n, tl.sum(a2, 0))
        tl.store(parts_ptr + (2 * T + t) * N + n, tl.sum(a3, 0))


@triton.jit
def _sum_of_parts(parts_ptr, row, n, N, T, BLOCK_T: tl.constexpr):
    ts = tl.arange(0, BLOCK_T)
    return tl.sum(tl.load(parts_ptr + (row * T + ts) * N + n, mask=ts < T, other=0.0), 0)


@triton.jit
def _split_program(eps_ptr, alpha_ptr, eps, eps_m, eps_l, alpha, alpha_m, alpha_l, lo, lo_m, lo_l,
                   hi, hi_m, hi_l, EPS_T: tl.constexpr, ALPHA_T: tl.constexpr, ACC: tl.constexpr):
    """A split kernel's program: sample n, chunk t of T, and the sample's scalars."""
    n = tl.program_id(0).to(tl.int64)
    e, a, lo_, hi_ = _scalars(n, eps_ptr, alpha_ptr, eps, eps_m, eps_l, alpha, alpha_m, alpha_l, lo,
                              lo_m, lo_l, hi, hi_m, hi_l, EPS_T, ALPHA_T, ACC)
    return n, tl.program_id(1).to(tl.int64), tl.num_programs(1), e, a, lo_, hi_


@triton.jit
def _l2_split_kernel(out_ptr, xa_ptr, g_ptr, xn_ptr, parts_ptr, eps_ptr, alpha_ptr, eps, eps_m,
                     eps_l, alpha, alpha_m, alpha_l, lo, lo_m, lo_l, hi, hi_m, hi_l, N, S, CHUNK,
                     D2, D3, so_n, so_1, so_2, so_3, sa_n, sa_1, sa_2, sa_3, sg_n, sg_1, sg_2,
                     sg_3, sx_n, sx_1, sx_2, sx_3, EPS_T: tl.constexpr, ALPHA_T: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    n, t, T, e, a, lo_, hi_ = _split_program(eps_ptr, alpha_ptr, eps, eps_m, eps_l, alpha, alpha_m,
                                             alpha_l, lo, lo_m, lo_l, hi, hi_m, hi_l,
                                             EPS_T, ALPHA_T, ACC)
    gg = _sum_of_parts(parts_ptr, 0, n, N, T, BLOCK_T)
    gd = _sum_of_parts(parts_ptr, 1, n, N, T, BLOCK_T)
    dd = _sum_of_parts(parts_ptr, 2, n, N, T, BLOCK_T)
    step = a / tl.maximum(tl.sqrt(gg), 1e-12)
    dn = tl.sqrt(tl.maximum(dd + step * (2 * gd + step * gg), 0.0))
    f = tl.where(dn > e, e / tl.maximum(dn, 1e-30), 1.0)
    start = t * CHUNK
    _l2_apply(out_ptr, xa_ptr, g_ptr, xn_ptr, n, start, tl.minimum(start + CHUNK, S), step, f, e,
              lo_, hi_, D2, D3, so_n, so_1, so_2, so_3, sa_n, sa_1, sa_2, sa_3, sg_n, sg_1, sg_2,
              sg_3, sx_n, sx_1, sx_2, sx_3, EPS_T, BLOCK, ACC)


@triton.jit
def _mifgsm_split_kernel(xa_ptr, g_ptr, buf_ptr, xn_ptr, parts_ptr, eps_ptr, alpha_ptr, eps, eps_m,
                         eps_l, alpha, alpha_m, alpha_l, lo, lo_m, lo_l, hi, hi_m, hi_l, decay,
                         decay_m, decay_l, N, S, CHUNK, D2, D3, sa_n, sa_1, sa_2, sa_3, sg_n,
                         sg_1, sg_2, sg_3, sb_n, sb_1, sb_2, sb_3, sx_n, sx_1, sx_2, sx_3,
                         EPS_T: tl.constexpr, ALPHA_T: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK: tl.constexpr, ACC: tl.constexpr):
    n, t, T, e, a, lo_, hi_ = _split_program(eps_ptr, alpha_ptr, eps, eps_m, eps_l, alpha, alpha_m,
                                             alpha_l, lo, lo_m, lo_l, hi, hi_m, hi_l,
                                             EPS_T, ALPHA_T, ACC)
    dec = _decay(decay, decay_m, decay_l, ACC)
    mean = _sum_of_parts(parts_ptr, 0, n, N, T, BLOCK_T) / S
    div = tl.where(mean == 0, 1.0, mean)
    start = t * CHUNK
    _mifgsm_apply(xa_ptr, g_ptr, buf_ptr, xn_ptr, n, start, tl.minimum(start + CHUNK, S), div, dec,
                  e, a, lo_, hi_, D2, D3, sa_n, sa_1, sa_2, sa_3, sg_n, sg_1, sg_2, sg_3, sb_n,
                  sb_1, sb_2, sb_3, sx_n, sx_1, sx_2, sx_3, EPS_T, BLOCK, ACC)


# A per-sample reduction is split along S so that it gets about MIN_PROGRAMS programs (two
# waves of an H100's 132 SMs) when there are few samples, and, at any N, so that no program
# walks more than MAX_CHUNK_BLOCKS blocks of a sample: one program per 224² ImageNet sample
# (147 blocks, read three times) was 1.9x slower than torch.compile's step at N=256 on an H200
# (issue 29). Samples of at most MAX_CHUNK_BLOCKS blocks keep the one-program-per-sample
# kernels when there are enough of them (one launch; their re-reads are small).
MIN_PROGRAMS = 264
MAX_CHUNK_BLOCKS = 16
BLOCK = 1024


def _split(N: int, S: int) -> tuple[int, int]:
    """(T, CHUNK): chunks per sample (1: the one-program-per-sample kernels) and their
    length, a multiple of BLOCK."""
    blocks = triton.cdiv(S, BLOCK)
    T = max(MIN_PROGRAMS // max(N, 1), triton.cdiv(blocks, MAX_CHUNK_BLOCKS))
    T = max(1, min(blocks, T))
    chunk = triton.cdiv(blocks, T) * BLOCK
    return triton.cdiv(S, chunk), chunk


def _geometry(*ts):
    """How the kernels address each tensor (all of ts[0]'s shape): (D2, D3, strides), the
    sample's dims taken in the order of ts[0]'s memory (largest stride first), adjacent dims
    merged where every tensor allows it, as at most three dims of sizes D1, D2, D3 (padded
    with size 1), and per tensor (sample stride, s1, s2, s3). None: more than three dims that
    no merge reduces."""
    ref = ts[0]
    dims = sorted((d for d in range(1, ref.dim()) if ref.shape[d] != 1),
                  key=lambda d: -ref.stride(d))
    merged = []  # [size, [stride in each tensor]]
    for d in dims:
        size, st = ref.shape[d], [t.stride(d) for t in ts]
        if merged and all(p == q * size for p, q in zip(merged[-1][1], st)):
            merged[-1] = [merged[-1][0] * size, st]
        else:
            merged.append([size, st])
    if len(merged) > 3:
        return None
    merged += [[1, [1] * len(ts)]] * (3 - len(merged))
    strides = tuple(x for i, t in enumerate(ts)
                    for x in (t.stride(0), merged[0][1][i], merged[1][1][i], merged[2][1][i]))
    return merged[1][0], merged[2][0], strides


def _copied(fn, written, *ts):
    """fn on contiguous copies of ts (one per distinct tensor), `written` ones copied back:
    the layouts `_geometry` cannot address. Not replayable (a copy); the plan says why."""
    rec = active()
    if rec is not None:
        rec.plan.refuse("a PGD tensor whose sample dims merge into no three strided dims "
                        "(copied to contiguous memory)")
    seen = {}
    work = [seen.setdefault(id(t), t.contiguous()) for t in ts]
    fn(*work)
    for t, w in zip(ts, work):
        if w is not t and any(t is x for x in written):
            t.copy_(w)


def _check_written(**ts):
    for name, t in ts.items():
        if not no_overlap(t):
            raise ValueError(f"fastrobust: {name} has elements that share memory (strides "
                             f"{tuple(t.stride())}); the PGD step writes each element once")


def _sums(x_adv, grad, x_nat, N, S, T, chunk, l2, flags, geo):
    D2, D3, st = geo
    parts = torch.empty(3 if l2 else 1, T, N, device=x_adv.device, dtype=acc_dtype(x_adv))
    launch(_sample_sums_kernel, (N, T), x_adv, grad, x_nat, parts, N, S, chunk, D2, D3, *st,
           L2=l2, BLOCK=BLOCK, ACC=flags["ACC"])
    return parts


def _launch_args(x, eps_t, eps, alpha_t, alpha, clip_min, clip_max):
    """Pointer/scalar arguments shared by the kernels: each float as its three fp32 parts (a
    kernel's float argument is fp32; fp64 inputs use all three, _common._scalar)."""
    f64 = acc_dtype(x) == torch.float64
    ptrs = (eps_t if eps_t is not None else x, alpha_t if alpha_t is not None else x)
    flags = dict(EPS_T=eps_t is not None, ALPHA_T=alpha_t is not None,
                 ACC=tl.float64 if f64 else tl.float32)
    scal = tuple(p for v in (eps, alpha, clip_min, clip_max) for p in fp32_parts(v))
    return ptrs, scal, flags


def pgd_update(out, x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, mode, clip_min,
               clip_max) -> None:
    """out = clamp(x_nat + P(x_adv + alpha·dir(grad) − x_nat)); the signature of the C++
    kernel (csrc/pgd/math.h). The tensors have x_adv's shape, each its own strides."""
    _check_written(x_adv=out)
    if x_adv.numel() == 0:
        return
    geo = _geometry(out, x_adv, grad, x_nat)
    if geo is None:
        return _copied(lambda *w: pgd_update(*w, eps_t, eps, alpha_t, alpha, mode, clip_min,
                                             clip_max), (out,), out, x_adv, grad, x_nat)
    N = x_adv.shape[0]
    S = x_adv.numel() // N
    ptrs, scal, flags = _launch_args(x_adv, eps_t, eps, alpha_t, alpha, clip_min, clip_max)
    with on_device(x_adv):
        _launch_pgd(out, x_adv, grad, x_nat, ptrs, scal, flags, mode, N, S, geo)


def _launch_pgd(out, x_adv, grad, x_nat, ptrs, scal, flags, mode, N, S, geo):
    D2, D3, st = geo
    if mode == PgdMode.L2:
        T, chunk = _split(N, S)
        if T == 1:
            launch(_l2_kernel, (N,), out, x_adv, grad, x_nat, *ptrs, *scal, S, D2, D3, *st,
                   BLOCK=BLOCK, **flags)
        else:
            parts = _sums(x_adv, grad, x_nat, N, S, T, chunk, True, flags,
                          (D2, D3, st[4:]))
            launch(_l2_split_kernel, (N, T), out, x_adv, grad, x_nat, parts, *ptrs, *scal, N, S,
                   chunk, D2, D3, *st, BLOCK_T=triton.next_power_of_2(T), BLOCK=BLOCK, **flags)
    elif mode in (PgdMode.LINF_SIGN, PgdMode.LINF_RAW):
        block = min(2048, triton.next_power_of_2(S))
        s_blocks = triton.cdiv(S, block)
        launch(_linf_kernel, tiles_grid("x_adv", N, s_blocks), out, x_adv, grad, x_nat, *ptrs,
               *scal, S, s_blocks, D2, D3, *st, SIGN=mode == PgdMode.LINF_SIGN, BLOCK=block,
               **flags)
    else:
        raise ValueError(f"unknown pgd mode {mode}")


def mifgsm_update(x_adv, grad, buf, x_nat, eps_t, eps, alpha_t, alpha, decay, clip_min,
                  clip_max) -> None:
    """MI-FGSM momentum and linf step, x_adv and buf in place; each tensor its own strides."""
    _check_written(x_adv=x_adv, momentum=buf)
    if x_adv.numel() == 0:
        return
    geo = _geometry(x_adv, grad, buf, x_nat)
    if geo is None:
        return _copied(lambda *w: mifgsm_update(*w, eps_t, eps, alpha_t, alpha, decay, clip_min,
                                                clip_max), (x_adv, buf), x_adv, grad, buf, x_nat)
    D2, D3, st = geo
    N = x_adv.shape[0]
    S = x_adv.numel() // N
    ptrs, scal, flags = _launch_args(x_adv, eps_t, eps, alpha_t, alpha, clip_min, clip_max)
    T, chunk = _split(N, S)
    with on_device(x_adv):
        if T == 1:
            launch(_mifgsm_kernel, (N,), x_adv, grad, buf, x_nat, *ptrs, *scal, *fp32_parts(decay),
                   S, D2, D3, *st, BLOCK=BLOCK, **flags)
        else:
            parts = _sums(x_adv, grad, x_nat, N, S, T, chunk, False, flags,
                          (D2, D3, st[:8] + st[12:]))
            launch(_mifgsm_split_kernel, (N, T), x_adv, grad, buf, x_nat, parts, *ptrs, *scal,
                   *fp32_parts(decay), N, S, chunk, D2, D3, *st, BLOCK_T=triton.next_power_of_2(T),
                   BLOCK=BLOCK, **flags)


# --- the ops (csrc/pgd/ops.cpp): each tensor in its own layout, no copy ------------------------

def pgd_step(x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, l2, clip_min, clip_max):
    pgd_update(x_adv, x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, step_mode(l2), clip_min,
               clip_max)


def pgd_init(noise, x_nat, eps_t, eps, radius, l2, clip_min, clip_max):
    pgd_update(noise, x_nat, noise, x_nat, *init_args(eps_t, eps, radius, l2), clip_min,
               clip_max)


def mifgsm_step(x_adv, grad, momentum, x_nat, eps_t, eps, alpha_t, alpha, decay, clip_min,
                clip_max):
    mifgsm_update(x_adv, grad, momentum, x_nat, eps_t, eps, alpha_t, alpha, decay, clip_min,
                  clip_max)
