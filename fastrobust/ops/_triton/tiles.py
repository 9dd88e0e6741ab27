"""Pieces the Triton kernel files of every family share: the jit
helpers that locate a program's tile of an [N, C, S] tensor, and the launch helpers that pick
tile shapes, splits and grids on the host."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles_grid
from .plan import launch

# A reduction over planes gets at least this many programs: when N·C is small the planes are
# split along S (a GPU has 100+ SMs; the interpreter runs programs one by one, so tests set it
# low to exercise the split).
MIN_PROGRAMS = 512


# --- jit helpers ---------------------------------------------------------------------------------

@triton.jit
def _safe(t):
    return tl.where(t != 0, t, 1.0)


@triton.jit
def _zero_kernel(ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(ptr + offs, tl.zeros([BLOCK], ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def _scalar(hi, mid, lo, ACC: tl.constexpr):
    """A float argument of the op in ACC: fp32 from its first part, fp64 from all three
    (_plan.fp32_parts: a kernel's float argument is fp32; the parts' fp64 sum is exact)."""
    if ACC == tl.float64:
        return (tl.zeros([], tl.float64) + hi) + mid + lo
    else:
        return tl.zeros([], tl.float32) + hi  # (the interpreter passes a Python float)


@triton.jit
def _tile(n, cs, ss, sn, sc, ss_):
    """Offsets of the [BLOCK_S, BLOCK_C] tile (ss, cs) of sample n, in int64."""
    return n * sn + cs.to(tl.int64)[None, :] * sc + ss.to(tl.int64)[:, None] * ss_


@triton.jit
def _plane_block(c_blocks):
    """(n, channel block) of this program on grid axis 0, numbered channel block first: N and
    C/BLOCK_C share the axis that takes 2³¹ − 1 programs (y and z take only 65,535)."""
    pid = tl.program_id(0)
    return (pid // c_blocks).to(tl.int64), pid % c_blocks


@triton.jit
def _plane_tile(c_blocks, s_blocks):
    """(n, channel block, spatial block) of this program on grid axis 0 alone, the spatial
    block fastest (consecutive programs read consecutive memory of a plane)."""
    pid = tl.program_id(0)
    sb = pid % s_blocks
    pc = pid // s_blocks
    return (pc // c_blocks).to(tl.int64), pc % c_blocks, sb


@triton.jit
def _plane_split(c_blocks, C, S, CHUNK, BLOCK_C: tl.constexpr):
    """A split reduction's program: (n, channels, their mask, split t, splits T, start, end of
    its range of S), the plane block on axis 0 (`_plane_block`), the split on axis 1."""
    n, cb = _plane_block(c_blocks)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    t = tl.program_id(1).to(tl.int64)
    start = t * CHUNK
    return n, cs, cs < C, t, tl.num_programs(1), start, tl.minimum(start + CHUNK, S)


@triton.jit
def _sum_parts(parts_ptr, j, ns, cs, N, C, T):
    """Σ_t parts[j, t, ns, cs] → [BLOCK_N, BLOCK_C]."""
    NC = N * C
    off = ns[:, None] * C + cs[None, :]
    m = (ns < N)[:, None] & (cs < C)[None, :]
    acc = tl.load(parts_ptr + j * T * NC + off, mask=m, other=0.0)
    for t in range(1, T):
        acc += tl.load(parts_ptr + (j * T + t) * NC + off, mask=m, other=0.0)
    return acc


# --- launch helpers ------------------------------------------------------------------------------

def _ncs(t: torch.Tensor) -> torch.Tensor:
    """View as [N, C, S]; only a layout that no view can express is copied. (S is spelled
    out: an empty batch cannot infer a -1.)"""
    N, C = t.shape[0], t.shape[1]
    if t.dim() == 2:
        return t.unsqueeze(2)
    S = 1
    for d in t.shape[2:]:
        S *= d
    try:
        return t.view(N, C, S)
    except RuntimeError:
        return t.reshape(N, C, S)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(t3: torch.Tensor, reduce: bool):
    """Tile shape (BLOCK_C, BLOCK_S): along S when planes are contiguous, along C when
    channels are (channels_last, [N, C] inputs)."""
    C, S = t3.shape[1], t3.shape[2]
    if t3.stride(1) == 1 and C > 1 and (t3.stride(2) != 1 or S == 1):
        block_c = min(64, triton.next_power_of_2(C))
        return block_c, max(1, min(triton.next_power_of_2(S), 2048 // block_c))
    return 1, min(1024 if reduce else 2048, triton.next_power_of_2(max(S, 1)))


def _splits(N: int, c_blocks: int, S: int, block_s: int) -> tuple[int, int]:
    """(T, CHUNK): how a reduction over each plane is split along S so the grid has at least
    MIN_PROGRAMS programs; CHUNK is a multiple of block_s."""
    s_blocks = triton.cdiv(max(S, 1), block_s)
    T = max(1, min(s_blocks, triton.cdiv(MIN_PROGRAMS, max(N * c_blocks, 1))))
    chunk = triton.cdiv(s_blocks, T) * block_s
    return triton.cdiv(max(S, 1), chunk), chunk


def grad_parts_shape(x: torch.Tensor, need_s: bool) -> tuple:
    """The shape of the per-plane partial sums the BN's gradient kernel writes for x (the
    synchronized BN's `parts`): 4 or 2 sums (with the input scale's), per split, per plane."""
    x3 = _ncs(x)
    N, C, S = x3.shape
    block_c, block_s = _blocks(x3, True)
    T, _ = _splits(N, triton.cdiv(C, block_c), S, block_s)
    return (4 if need_s else 2, T, N, C)


def _tiles_grid(N: int, c_blocks: int, s_blocks: int) -> tuple[int]:
    """The 1-D grid of a per-tile kernel (`_plane_tile`): every (n, channel block, spatial
    block) on axis x."""
    return tiles_grid("x", N, c_blocks, s_blocks)


def _like(x: torch.Tensor) -> torch.Tensor:
    """An output shaped and laid out like x (dense)."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


def _zero(*tensors) -> None:
    """Fills fresh contiguous tensors with zeros by a launch (a fill on the host is no launch:
    a plan could not replay it)."""
    for t in tensors:
        if t.numel():
            launch(_zero_kernel, (triton.cdiv(t.numel(), 1024),), t, t.numel(), BLOCK=1024)


def _c(t):
    return None if t is None else t.contiguous()


def no_overlap(t) -> bool:
    """No two elements of t share memory (sufficient test: each stride, in increasing order,
    passes the extent of the smaller ones), so the kernels can write t elementwise."""
    extent = 0
    for st, sz in sorted((abs(st), sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if st <= extent:
            return False
        extent += (sz - 1) * st
    return True
