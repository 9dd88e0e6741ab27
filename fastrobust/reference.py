"""Plain-PyTorch references: the ground truth for tests and benchmarks.

Written for clarity, not speed. `multi_batch_norm` is differentiable through autograd, so tests
take its gradients as the truth. `multi_bn_forward` / `multi_bn_backward` are the same math as
explicit forward and backward passes with the signatures of the compiled kernels; they are the
"eager" backend that serves when no kernel can (e.g. CPU without `fastrobust._C`).

Math (shared/DESIGN.md §2.1), for sample n routed to branch k = branch[n], channel c:
    μ_kc, σ²_kc = mean and biased variance over {x[n', c, s] : branch[n'] = k}
    y = (x - μ_kc) · r_kc · w_kc + b_kc,   r_kc = 1 / sqrt(σ²_kc + eps)
    dx = w·r·(dy - Σdy/m - x̂·Σ(dy·x̂)/m),  x̂ = (x - μ)·r,  m = count_k · prod(spatial)
No step syncs with the host: routing goes through gathers and scatters, never masks.
"""
from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(x: Tensor) -> torch.dtype:
    """Statistics accumulate in fp32, or fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_branch_values(branch: Tensor, num_branches: int) -> None:
    """Out-of-range branch ids are an error: raised at once on CPU, asserted asynchronously on
    the device elsewhere (no host sync)."""
    in_range = ((branch >= 0) & (branch < num_branches)).all()
    if branch.device.type == "cpu":
        if not bool(in_range):
            bad = branch[(branch < 0) | (branch >= num_branches)]
            raise ValueError(f"multi_batch_norm: branch ids out of range [0, {num_branches}): "
                             f"{bad[:8].tolist()}")
    else:
        torch._assert_async(in_range,
                            f"multi_batch_norm: branch id out of range [0, {num_branches})")


def _per_branch_sum(t: Tensor, branch: Tensor, num_branches: int) -> Tensor:
    """Σ over the samples of each branch: [N, ...] → [K, ...]. A scatter, not a one-hot
    product, so a NaN stays in its own branch (0·NaN would spread it)."""
    return t.new_zeros((num_branches,) + t.shape[1:]).index_add_(0, branch, t)


def branch_moments(x: Tensor, branch: Tensor, num_branches: int):
    """Per-(branch, channel) element count [K], mean and biased variance [K, C] (acc dtype)."""
    acc = acc_dtype(x)
    xs = x.to(acc).flatten(2) if x.dim() > 2 else x.to(acc)[:, :, None]  # [N, C, S]
    count = _per_branch_sum(torch.ones_like(branch, dtype=acc), branch, num_branches)
    count = count * xs.shape[2]  # [K]
    denom = count.clamp_min(1)[:, None]
    mean = _per_branch_sum(xs.sum(2), branch, num_branches) / denom
    centered = xs - mean[branch][:, :, None]
    var = _per_branch_sum(centered.square().sum(2), branch, num_branches) / denom
    return count, mean, var


@torch.no_grad()
def updated_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                          momentum: float, cumulative: bool):
    """New (running_mean, running_var, num_batches_tracked): r ← (1-m)·r + m·stat for branches
    with count ≥ 2; other branches keep their stats and counter. Cumulative (momentum=None)
    uses m = 1/(batches seen by that branch). Without a counter, the third is empty."""
    valid = count >= 2  # [K]
    if cumulative:
        m = 1.0 / (num_batches_tracked + 1).to(mean.dtype)
    else:
        m = torch.full_like(count, momentum, dtype=mean.dtype)
    m = m[:, None]
    unbiased = var * (count / (count - 1).clamp_min(1))[:, None]
    rm, rv = running_mean.to(mean.dtype), running_var.to(mean.dtype)
    new_mean = torch.where(valid[:, None], (1 - m) * rm + m * mean, rm)
    new_var = torch.where(valid[:, None], (1 - m) * rv + m * unbiased, rv)
    if num_batches_tracked is None:
        new_count = count.new_empty(0, dtype=torch.long)
    else:
        new_count = num_batches_tracked + valid.to(num_batches_tracked.dtype)
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype), new_count


def no_running_update(x: Tensor):
    """The three empty tensors a forward returns when it updates no running stats."""
    return (x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=torch.long))


def _per_sample(t: Tensor, branch: Tensor, ndim: int) -> Tensor:
    """[K, C] → [N, C, 1, ...] gathered by branch, broadcastable against x."""
    return t[branch].reshape(*t[branch].shape, *([1] * (ndim - 2)))


def multi_batch_norm(x, branch, weight=None, bias=None, running_mean=None, running_var=None, *,
                     num_branches: int | None = None, training: bool = True,
                     momentum: float | None = 0.1, eps: float = 1e-5,
                     num_batches_tracked=None) -> Tensor:
    """Differentiable reference of fastrobust.functional.multi_batch_norm."""
    K = num_branches if num_branches is not None else _infer_k(weight, running_mean)
    acc = acc_dtype(x)
    batch_stats = training or running_mean is None
    if batch_stats:
        count, mean, var = branch_moments(x, branch, K)
        if training and running_mean is not None:
            new = updated_running_stats(running_mean, running_var, num_batches_tracked,
                                        mean.detach(), var.detach(), count, momentum or 0.0,
                                        momentum is None)
            with torch.no_grad():
                running_mean.copy_(new[0])
                running_var.copy_(new[1])
                if num_batches_tracked is not None:
                    num_batches_tracked.copy_(new[2])
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(acc)
    y = (x.to(acc) - _per_sample(mean, branch, x.dim())) * _per_sample(scale, branch, x.dim())
    if bias is not None:
        y = y + _per_sample(bias.to(acc), branch, x.dim())
    return y.to(x.dtype)


def _infer_k(*tensors) -> int:
    for t in tensors:
        if t is not None:
            return t.shape[0]
    raise ValueError("num_branches is needed when weight and running stats are all None")


# --- the "eager" backend: explicit forward and backward with the kernels' signatures ---------

@torch.no_grad()
def multi_bn_forward(x, branch, weight, bias, running_mean, running_var, num_batches_tracked,
                     num_branches, training, momentum, cumulative, eps):
    check_branch_values(branch, num_branches)
    acc = acc_dtype(x)
    new_running = no_running_update(x)
    if training or running_mean is None:
        count, mean, var = branch_moments(x, branch, num_branches)
        if training and running_mean is not None:
            new_running = updated_running_stats(running_mean, running_var, num_batches_tracked,
                                                mean, var, count, momentum, cumulative)
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc)
    invstd = torch.rsqrt(var + eps)
    a = invstd if weight is None else invstd * weight.to(acc)
    d = -mean * a if bias is None else bias.to(acc) - mean * a
    y = x.to(acc) * _per_sample(a, branch, x.dim()) + _per_sample(d, branch, x.dim())
    return (y.to(x.dtype), mean, invstd, *new_running)


@torch.no_grad()
def multi_bn_backward(dy, x, branch, weight, mean, invstd, num_branches, batch_stats,
                      need_param_grads):
    acc = mean.dtype
    K, C = mean.shape
    nd = x.dim()
    xhat = (x.to(acc) - _per_sample(mean, branch, nd)) * _per_sample(invstd, branch, nd)
    dy_ = dy.to(acc)
    sum_dims = tuple(range(2, nd))

    def per_branch(t):  # Σ over spatial and over the samples of each branch → [K, C]
        return _per_branch_sum(t.sum(sum_dims) if sum_dims else t, branch, K)

    w = torch.ones_like(invstd) if weight is None else weight.to(acc)
    if batch_stats or need_param_grads:
        sdy, sdyxhat = per_branch(dy_), per_branch(dy_ * xhat)
    if batch_stats:
        count = _per_branch_sum(torch.ones_like(branch, dtype=acc), branch, K)
        m = (count * (x[0, 0].numel() if x.shape[0] else 1)).clamp_min(1)[:, None]
        dx = _per_sample(w * invstd, branch, nd) * (
            dy_ - _per_sample(sdy / m, branch, nd) - xhat * _per_sample(sdyxhat / m, branch, nd))
    else:
        dx = dy_ * _per_sample(w * invstd, branch, nd)
    if need_param_grads:
        dweight, dbias = sdyxhat, sdy
    else:
        dweight, dbias = x.new_empty((0, C), dtype=acc), x.new_empty((0, C), dtype=acc)
    return dx.to(x.dtype), dweight, dbias
