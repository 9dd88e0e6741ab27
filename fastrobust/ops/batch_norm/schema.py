"""The routed / mixed batch norm's Python side of its schema (csrc/batch_norm/ops.cpp): the
argument struct, the fake (meta) implementations of its ops and the differentiable backward
that serves second derivatives.

    functional.multi_batch_norm ─┐
    functional.mixed_batch_norm ─┴─ fastrobust::multi_bn ─────┐ Autograd (one C++ node,
    distributed.sync_*_batch_norm ─ fastrobust::sync_multi_bn ┘ batch_norm/autograd.cpp), the
        (its node calls sync_bn_stats, all-reduce,             device's kernel: CPU C++,
         sync_bn_apply forward; sync_bn_grad_sums,             CUDA Triton (triton.py,
         all-reduce, sync_bn_dx backward)                      sync_triton.py), else eager
                                                               (eager.py, sync_eager.py)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _triton
from .._common import BNGrad, acc_dtype


class BnArgs(NamedTuple):
    """The arguments of fastrobust::multi_bn in its schema's order: every Python implementation
    of the op (the fake, eager.py, triton.py) takes them as `*args` and builds this once."""
    x: Tensor
    branch: Tensor | None           # int64 [N] (routed), or None
    mix: Tensor | None              # [N, K] (mixed), or None
    weight: Tensor | None           # [K, C]
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None  # int64 [K]
    input_scale: Tensor | None      # [N, C]
    film_gamma: Tensor | None
    film_beta: Tensor | None
    num_branches: int
    training: bool
    momentum: float
    cumulative: bool
    eps: float
    relu: bool

    @property
    def batch_stats(self) -> bool:
        """Whether the statistics come from the batch (training, or no running stats)."""
        return bool(self.training) or self.running_mean is None

    @property
    def updates_running(self) -> bool:
        return bool(self.training) and self.running_mean is not None


def backward_needs(needs, mix, input_scale, film_gamma, film_beta) -> tuple:
    """multi_bn_backward's `needs`, with the gradient of an argument that is None not needed
    (as the C++ kernels do): x, weight and bias always have one."""
    optional = {BNGrad.MIX: mix, BNGrad.INPUT_SCALE: input_scale,
                BNGrad.FILM_GAMMA: film_gamma, BNGrad.FILM_BETA: film_beta}
    return tuple(bool(n) and optional.get(BNGrad(i), True) is not None
                 for i, n in enumerate(needs))


# --- fake (meta) implementations: shapes and dtypes only -------------------------------------

def _fake_multi_bn(*args):
    a = BnArgs(*args)
    acc = acc_dtype(a.x)
    stats = (a.num_branches, a.x.shape[1])
    planes = (2, *a.x.shape[:2]) if a.mix is not None and a.batch_stats else (0,)
    return (torch.empty_like(a.x), a.x.new_empty(stats, dtype=acc),
            a.x.new_empty(stats, dtype=acc), a.x.new_empty(planes, dtype=acc))


def _fake_multi_bn_backward(dy, x, branch, mix, weight, bias, mean, invstd, planes,
                            input_scale, film_gamma, film_beta, num_branches, batch_stats, relu,
                            needs):
    acc = acc_dtype(x)
    N, C = x.shape[:2]
    shapes = {BNGrad.MIX: (N, num_branches), BNGrad.WEIGHT: (num_branches, C),
              BNGrad.BIAS: (num_branches, C), BNGrad.INPUT_SCALE: (N, C),
              BNGrad.FILM_GAMMA: (N, C), BNGrad.FILM_BETA: (N, C)}
    out = [torch.empty_like(x) if needs[BNGrad.X] else x.new_empty(0)]
    for g in list(BNGrad)[1:]:
        out.append(x.new_empty(shapes[g] if needs[g] else (0,), dtype=acc))
    return tuple(out)


def _fake_sync_bn_stats(x, branch, mix, input_scale, num_batches_tracked, num_branches,
                        cumulative, rank, world_size):
    acc = acc_dtype(x)
    K, (N, C) = num_branches, x.shape[:2]
    return (x.new_empty((world_size, K + 3 * K * C), dtype=torch.float64),
            x.new_empty((2, N, C) if mix is not None else (0,), dtype=acc),
            x.new_empty(K if cumulative and num_batches_tracked is not None else 0, dtype=acc))


def _fake_sync_bn_apply(*args):
    a, _, _ = sync_apply_args(args)
    acc = acc_dtype(a.x)
    stats = (a.num_branches, a.x.shape[1])
    return (torch.empty_like(a.x), a.x.new_empty(stats, dtype=acc),
            a.x.new_empty(stats, dtype=acc))


def _sync_parts_shape(x, need_s) -> tuple:
    """The shape of sync_bn_grad_sums' `parts`: the Triton kernels' per-plane partial sums
    where they serve the call, else empty."""
    if x.numel() == 0 or not _triton.serves(x.device):
        return (0,)
    from .._triton.tiles import grad_parts_shape  # (needs triton: imported where it serves)
    return grad_parts_shape(x, need_s)


def _fake_sync_bn_grad_sums(dy, x, branch, mix, weight, bias, mean, invstd, input_scale,
                            film_gamma, film_beta, num_branches, relu, needs):
    acc = mean.dtype
    stats = (num_branches, x.shape[1])
    need_s = bool(needs[BNGrad.INPUT_SCALE]) and input_scale is not None
    return (x.new_empty((2, *stats), dtype=acc),
            x.new_empty(_sync_parts_shape(x, need_s), dtype=acc),
            x.new_empty(stats if needs[BNGrad.WEIGHT] else (0,), dtype=acc),
            x.new_empty(stats if needs[BNGrad.BIAS] else (0,), dtype=acc))


def _fake_sync_bn_dx(dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale,
                     film_gamma, film_beta, sums, parts, payload, num_branches, relu, needs):
    acc = mean.dtype
    N, C = x.shape[:2]
    out = [torch.empty_like(x) if needs[BNGrad.X] else x.new_empty(0)]
    for g, t, shape in ((BNGrad.MIX, mix, (N, num_branches)),
                        (BNGrad.INPUT_SCALE, input_scale, (N, C)),
                        (BNGrad.FILM_GAMMA, film_gamma, (N, C)),
                        (BNGrad.FILM_BETA, film_beta, (N, C))):
        out.append(x.new_empty(shape if needs[g] and t is not None else (0,), dtype=acc))
    return tuple(out)


def _fake_sync_multi_bn(x, *args):
    return torch.empty_like(x)


FAKES = {"multi_bn": _fake_multi_bn, "multi_bn_backward": _fake_multi_bn_backward,
         "sync_bn_stats": _fake_sync_bn_stats, "sync_bn_apply": _fake_sync_bn_apply,
         "sync_bn_grad_sums": _fake_sync_bn_grad_sums, "sync_bn_dx": _fake_sync_bn_dx,
         "sync_multi_bn": _fake_sync_multi_bn}


def sync_apply_args(args) -> tuple[BnArgs, Tensor, Tensor]:
    """sync_bn_apply's arguments, which are multi_bn's in training with the all-reduced
    `payload` and `old` (the counters before the update) after film_beta: (BnArgs, payload,
    old)."""
    return BnArgs(*args[:11], args[13], True, *args[14:]), args[11], args[12]
