"""The registered custom ops: schema, implementation dispatch, fake (meta) impl and autograd.

Every op is `torch.ops.fastrobust.<name>`. Its implementation asks `fastrobust.backends` which
kernel serves the call (C++, Triton, CUDA C++ or the reference) and calls that module's function
of the same name. The fake impls let `torch.compile(fullgraph=True)` trace models that use the
ops; autograd calls the matching backward op, which is itself a registered op.

    fastrobust.functional.multi_batch_norm
      └─ torch.ops.fastrobust.multi_bn_fwd ──(autograd)── torch.ops.fastrobust.multi_bn_bwd
           └─ backends.select("multi_bn", ...).multi_bn_forward / .multi_bn_backward
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .reference import acc_dtype


# --- multi_bn ---------------------------------------------------------------------------------

@torch.library.custom_op("fastrobust::multi_bn_fwd", mutates_args=())
def multi_bn_fwd(x: Tensor, branch: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 num_batches_tracked: Optional[Tensor], num_branches: int, training: bool,
                 momentum: float, cumulative: bool, eps: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, mean, invstd, new_running_mean, new_running_var, new_num_batches_tracked).

    mean/invstd [K, C] are the statistics y was normalized with. The op is functional (autograd
    can only be registered on functional ops): in training it returns the updated running
    stats, which `functional.multi_batch_norm` copies into the buffers, and empty tensors when
    there is nothing to update."""
    impl = backends.select("multi_bn", x.device, (x, weight, bias, running_mean, running_var))
    return impl.multi_bn_forward(x, branch, weight, bias, running_mean, running_var,
                                 num_batches_tracked, num_branches, training, momentum,
                                 cumulative, eps)


@multi_bn_fwd.register_fake
def _(x, branch, weight, bias, running_mean, running_var, num_batches_tracked, num_branches,
      training, momentum, cumulative, eps):
    stats = (num_branches, x.shape[1])
    if training and running_mean is not None:
        new_running = (torch.empty_like(running_mean), torch.empty_like(running_var),
                       x.new_empty(0 if num_batches_tracked is None else num_branches,
                                   dtype=torch.long))
    else:
        new_running = (x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=torch.long))
    return (torch.empty_like(x), x.new_empty(stats, dtype=acc_dtype(x)),
            x.new_empty(stats, dtype=acc_dtype(x)), *new_running)


@torch.library.custom_op("fastrobust::multi_bn_bwd", mutates_args=())
def multi_bn_bwd(dy: Tensor, x: Tensor, branch: Tensor, weight: Optional[Tensor], mean: Tensor,
                 invstd: Tensor, num_branches: int, batch_stats: bool, need_param_grads: bool
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias); dweight/dbias are [K, C] in the statistics' dtype, or
    [0, C] when not needed."""
    impl = backends.select("multi_bn", x.device, (x, weight, mean, invstd))
    return impl.multi_bn_backward(dy, x, branch, weight, mean, invstd, num_branches,
                                  batch_stats, need_param_grads)


@multi_bn_bwd.register_fake
def _(dy, x, branch, weight, mean, invstd, num_branches, batch_stats, need_param_grads):
    rows = num_branches if need_param_grads else 0
    return (torch.empty_like(x), mean.new_empty((rows, x.shape[1])),
            mean.new_empty((rows, x.shape[1])))


def _multi_bn_setup(ctx, inputs, output):
    x, branch, weight, bias, running_mean, _, _, num_branches, training, *_ = inputs
    _, mean, invstd, *new_running = output
    ctx.mark_non_differentiable(mean, invstd, *new_running)
    ctx.save_for_backward(x, branch, weight, mean, invstd)
    ctx.num_branches = num_branches
    ctx.batch_stats = training or running_mean is None
    ctx.param_dtypes = (None if weight is None else weight.dtype,
                        None if bias is None else bias.dtype)


def _multi_bn_backward(ctx, dy, *_grads_of_statistics):
    x, branch, weight, mean, invstd = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    dx, dweight, dbias = torch.ops.fastrobust.multi_bn_bwd(
        dy, x, branch, weight, mean, invstd, ctx.num_branches, ctx.batch_stats, need_w or need_b)
    w_dtype, b_dtype = ctx.param_dtypes
    return (dx if need_x else None, None,
            dweight.to(w_dtype) if need_w else None,
            dbias.to(b_dtype) if need_b else None,
            None, None, None, None, None, None, None, None)


multi_bn_fwd.register_autograd(_multi_bn_backward, setup_context=_multi_bn_setup)
