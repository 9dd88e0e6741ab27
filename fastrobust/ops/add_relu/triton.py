"""Triton kernel of add_relu: relu(a + b) in one pass over equal-shape, equal-dtype tensors
(the residual join of a ResNet block). The sum is rounded to the inputs' dtype before the ReLU,
as `torch.relu(a + b)` does, so the two agree bitwise; a NaN passes through."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import on_device
from .._triton.plan import launch

BLOCK = 1024


@triton.jit
def _add_relu_kernel(a_ptr, b_ptr, out_ptr, total, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < total
    v = tl.load(a_ptr + offs, mask=m, other=0.0) + tl.load(b_ptr + offs, mask=m, other=0.0)
    tl.store(out_ptr + offs, tl.where(v < 0, 0.0, v).to(out_ptr.dtype.element_ty), mask=m)


def _dense(t: torch.Tensor) -> bool:
    """Storage is one dense block (any permutation of the dims, e.g. channels_last)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not (_dense(a) and a.stride() == b.stride()):
        a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a)  # keeps a's (dense) strides
    total = a.numel()
    if total:
        with on_device(a):
            launch(_add_relu_kernel, (triton.cdiv(total, BLOCK),), a, b, out, total, BLOCK=BLOCK)
    return out
