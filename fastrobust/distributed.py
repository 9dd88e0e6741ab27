"""Synchronized multi-branch batch norm for data-parallel training (torch.distributed, DDP).

In training, `sync_multi_batch_norm` / `sync_mixed_batch_norm` normalize every rank's samples
with the statistics of the *global* batch, per (branch, channel), as `nn.SyncBatchNorm` does
for one branch:

    forward   per rank: per-(k, c) weighted count and sums Σ(u − centre), Σ(u − centre)²
              (u = input_scale·x; fp64) → ONE all-reduce of a [world, K + 3·K·C] payload in
              which each rank filled its own row (an all-gather) → the ranks' sums merged
              exactly (Chan's update, cross terms included) → the fused op normalizes with
              them (BN·FiLM·ReLU in one pass), running stats updated from the global
              statistics
    backward  per rank: the fused backward with the statistics held fixed gives the per-(k, c)
              sums T1 = Σ M·dz and T2 = Σ M·dz·x̂ → ONE all-reduce of [2·K·C] values → the
              direct gradients and the statistics' share of ∂L/∂x (and of ∂L/∂input_scale,
              ∂L/∂mix) per plane: ∂L/∂u += Q·u + R

A branch present on some ranks only, or on none, is handled by the sums (its count is the
global one; a branch with no values keeps its running stats, as in the single-process op).
dweight and dbias are each rank's own (DDP averages parameter gradients); dx is the gradient
of the sum of every rank's loss, as nn.SyncBatchNorm's, so DDP's average gives the gradient of
the global batch's mean loss.

Both functions call one registered op, torch.ops.fastrobust.sync_multi_bn, whose C++ autograd
node (csrc/batch_norm/autograd.cpp) calls sync_bn_stats → all-reduce → sync_bn_apply forward and
sync_bn_grad_sums → all-reduce → sync_bn_dx backward, each through the dispatcher; the
all-reduce is torch's functional collective on the group's name. The four halves have a
kernel per device like every other op: the CPU's in C++ (csrc/batch_norm/sync_cpu.cpp), CUDA's the
Triton kernels (fastrobust/ops/batch_norm/sync_triton.py: 3 launches each way) launched from
C++ by the launch plans (csrc/launch/plans.cpp), the eager ones (fastrobust/ops/batch_norm/
sync_eager.py) elsewhere. Nothing
on the host reads a value.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .functional import _NARROW_INTS, _dense_extras, _num_branches, _python_types
from .ops._common import in_words_of

__all__ = ["sync_multi_batch_norm", "sync_mixed_batch_norm", "sync_active"]


def sync_active(process_group=None) -> bool:
    """True when statistics would be synchronized: torch.distributed is initialized and the
    group has more than one rank."""
    return (dist.is_available() and dist.is_initialized()
            and dist.get_world_size(process_group) > 1)


def _group(op: str, process_group) -> tuple[int, int, str]:
    """(this process's rank in the group, the group's size, the group's name) for the op's
    collectives; the default group when process_group is None."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{op}: torch.distributed is not initialized (call "
                           "init_process_group first, or use the unsynchronized op)")
    group = dist.group.WORLD if process_group is None else process_group
    return dist.get_rank(group), dist.get_world_size(group), group.group_name


def _sync(op, x, route, weight, bias, running_mean, running_var, momentum, eps,
          num_batches_tracked, input_scale, film_gamma, film_beta, activation, K, mixed,
          process_group):
    """The registered op on the public function's arguments (its checks are the argument
    checks), its errors in that function's words, as functional's batch norms."""
    K, _, momentum, cumulative, eps, relu = _python_types(
        op, "mix" if mixed else "branch", route, K, True, momentum, eps, activation)
    rank, world, name = _group(op, process_group)
    branch, mix = (None, route) if mixed else (route, None)
    extras = _dense_extras(x, (input_scale, film_gamma, film_beta))
    try:
        return torch.ops.fastrobust.sync_multi_bn.default(
            x, branch, mix, weight, bias, running_mean, running_var, num_batches_tracked,
            *extras, K, momentum, cumulative, eps, relu, rank, world, name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise in_words_of(op, e, x, K) from None


def sync_multi_batch_norm(x: Tensor, branch: Tensor, weight: Tensor | None = None,
                          bias: Tensor | None = None, running_mean: Tensor | None = None,
                          running_var: Tensor | None = None, *, momentum: float | None = 0.1,
                          eps: float = 1e-5, num_branches: int | None = None,
                          num_batches_tracked: Tensor | None = None,
                          input_scale: Tensor | None = None, film_gamma: Tensor | None = None,
                          film_beta: Tensor | None = None, activation: str | None = None,
                          process_group=None) -> Tensor:
    """`functional.multi_batch_norm` in training with statistics over every rank of
    ``process_group`` (the default group when None): one all-reduce forward, one backward.
    Arguments as there; every rank must call it (a collective)."""
    op = "sync_multi_batch_norm"
    K = _num_branches(op, num_branches, weight, bias, running_mean, running_var)
    if isinstance(branch, Tensor) and branch.dtype in _NARROW_INTS:
        branch = branch.long()
    return _sync(op, x, branch, weight, bias, running_mean, running_var, momentum, eps,
                 num_batches_tracked, input_scale, film_gamma, film_beta, activation, K, False,
                 process_group)


def sync_mixed_batch_norm(x: Tensor, mix: Tensor, weight: Tensor | None = None,
                          bias: Tensor | None = None, running_mean: Tensor | None = None,
                          running_var: Tensor | None = None, *, momentum: float | None = 0.1,
                          eps: float = 1e-5, num_batches_tracked: Tensor | None = None,
                          input_scale: Tensor | None = None, film_gamma: Tensor | None = None,
                          film_beta: Tensor | None = None, activation: str | None = None,
                          process_group=None) -> Tensor:
    """`functional.mixed_batch_norm` in training with mix-weighted statistics over every rank
    of ``process_group``: one all-reduce forward, one backward. Arguments as there."""
    K = mix.shape[1] if isinstance(mix, Tensor) and mix.dim() == 2 else 1
    return _sync("sync_mixed_batch_norm", x, mix, weight, bias, running_mean, running_var,
                 momentum, eps, num_batches_tracked, input_scale, film_gamma, film_beta,
                 activation, K, True, process_group)
