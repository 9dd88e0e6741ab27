"""The functional API (shared/DESIGN.md §2–3). Each function checks its arguments' metadata
(shapes, dtypes, devices) with clear errors, then calls its registered op in `fastrobust._ops`.
Value checks that would need a host sync on a device (out-of-range branch ids) happen inside
the kernels: at once on CPU, as an asynchronous device assert on CUDA."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _ops  # noqa: F401 - registers torch.ops.fastrobust.*

__all__ = ["multi_batch_norm"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_param(name: str, t: Tensor | None, x: Tensor, K: int) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if t.shape != (K, x.shape[1]):
        raise ValueError(f"{name} must have shape [num_branches, C] = [{K}, {x.shape[1]}], "
                         f"got {list(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def multi_batch_norm(x: Tensor, branch: Tensor, weight: Tensor | None = None,
                     bias: Tensor | None = None, running_mean: Tensor | None = None,
                     running_var: Tensor | None = None, *, training: bool = False,
                     momentum: float | None = 0.1, eps: float = 1e-5,
                     num_branches: int | None = None,
                     num_batches_tracked: Tensor | None = None) -> Tensor:
    """Sample-routed batch norm: sample n is normalized by branch ``branch[n]``'s statistics
    and affine parameters (dual BN is K=2, K-way BN any K; shared/DESIGN.md §2.1).

    Args:
        x: ``[N, C, *spatial]``, any memory format; float16/bfloat16/float32/float64.
        branch: int64 ``[N]`` with values in ``[0, K)``.
        weight, bias: ``[K, C]`` or None.
        running_mean, running_var: ``[K, C]`` or None; updated in place in training, per
            branch, only for branches that saw at least 2 values in this batch.
        training: normalize with the batch's per-branch statistics (and update the running
            stats); otherwise with the running stats (batch statistics when there are none).
        momentum: running-stat momentum; None is a cumulative average, which needs
            ``num_batches_tracked`` (``[K]`` int64, advanced for the branches updated).
        num_branches: K, needed only when weight, bias and running stats are all None.

    Statistics accumulate in fp32 (fp64 for fp64 inputs); the output has x's dtype.
    Differentiable in x, weight and bias.
    """
    if not isinstance(x, Tensor) or not isinstance(branch, Tensor):
        raise TypeError("multi_batch_norm: x and branch must be Tensors")
    if x.dim() < 2:
        raise ValueError(f"multi_batch_norm: x must be [N, C, *spatial], got shape {list(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"multi_batch_norm: x must be floating point, got {x.dtype}")
    if branch.dtype.is_floating_point or branch.dtype.is_complex or branch.dtype == torch.bool:
        raise TypeError(f"multi_batch_norm: branch must be an integer tensor (int64), "
                        f"got {branch.dtype}")
    if branch.shape != (x.shape[0],):
        raise ValueError(f"multi_batch_norm: branch must have shape [N] = [{x.shape[0]}], "
                         f"got {list(branch.shape)}")
    if branch.device != x.device:
        raise ValueError(f"multi_batch_norm: branch is on {branch.device} but x is on {x.device}")
    K = num_branches
    for t in (weight, bias, running_mean, running_var):
        if K is None and isinstance(t, Tensor) and t.dim() >= 1:
            K = t.shape[0]
    if K is None:
        raise ValueError("multi_batch_norm: pass num_branches when weight, bias and running "
                         "stats are all None")
    if K < 1:
        raise ValueError(f"multi_batch_norm: num_branches must be >= 1, got {K}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_param(name, t, x, K)
    if (running_mean is None) != (running_var is None):
        raise ValueError("multi_batch_norm: pass both running_mean and running_var, or neither")
    cumulative = momentum is None
    if num_batches_tracked is not None:
        if num_batches_tracked.shape != (K,) or num_batches_tracked.dtype != torch.int64:
            raise ValueError(f"multi_batch_norm: num_batches_tracked must be int64 [{K}], got "
                             f"{num_batches_tracked.dtype} {list(num_batches_tracked.shape)}")
    elif cumulative and training and running_mean is not None:
        raise ValueError("multi_batch_norm: momentum=None (cumulative average) needs "
                         "num_batches_tracked")
    y, _, _, new_mean, new_var, new_count = torch.ops.fastrobust.multi_bn_fwd(
        x, branch.long(), weight, bias, running_mean, running_var, num_batches_tracked, K,
        training, 0.0 if cumulative else float(momentum), cumulative, float(eps))
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
            if num_batches_tracked is not None:
                num_batches_tracked.copy_(new_count)
    return y
