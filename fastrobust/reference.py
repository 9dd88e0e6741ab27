"""Plain-PyTorch references: the ground truth for tests and benchmarks.

Written for clarity, not speed. Every function is differentiable through autograd, so tests
take its gradients as the truth. Nothing in the package imports this module (the eager backend
is `fastrobust/ops/*/eager.py`); it shares with the package only the small helpers of
`fastrobust.ops._common` (the accumulation dtype, the range checks and the running-stat rule).

Math (docs/math.md), for sample n routed to branch k = branch[n], channel c:
    μ_kc, σ²_kc = mean and biased variance over {x[n', c, s] : branch[n'] = k}
    y = (x - μ_kc) · r_kc · w_kc + b_kc,   r_kc = 1 / sqrt(σ²_kc + eps)
    dx = w·r·(dy - Σdy/m - x̂·Σ(dy·x̂)/m),  x̂ = (x - μ)·r,  m = count_k · prod(spatial)
No step syncs with the host: routing goes through gathers and scatters, never masks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .ops._common import acc_dtype, updated_running_stats


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


def _per_sample(t: Tensor, branch: Tensor, ndim: int) -> Tensor:
    """[K, C] → [N, C, 1, ...] gathered by branch, broadcastable against x."""
    return t[branch].reshape(*t[branch].shape, *([1] * (ndim - 2)))


def _extras_in(x: Tensor, input_scale):
    u = x.to(acc_dtype(x))
    return u if input_scale is None else u * _bc(input_scale.to(u.dtype), x.dim())


def _extras_out(y: Tensor, film_gamma, film_beta, activation):
    if film_gamma is not None:
        y = y * _bc(film_gamma.to(y.dtype), y.dim())
    if film_beta is not None:
        y = y + _bc(film_beta.to(y.dtype), y.dim())
    if activation == "relu":
        y = torch.relu(y)
    elif activation is not None:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return y


def _bc(t: Tensor, ndim: int) -> Tensor:
    """[N, C] or [C] → broadcastable against an [N, C, *spatial] tensor."""
    return t.reshape(*t.shape, *([1] * (ndim - 2)))


@torch.no_grad()
def _store(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    """Updates the running stats in place from this batch's statistics (docs/math.md)."""
    new = updated_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                count, momentum or 0.0, momentum is None)
    running_mean.copy_(new[0])
    running_var.copy_(new[1])
    if num_batches_tracked is not None:
        num_batches_tracked.copy_(new[2])


def multi_batch_norm(x, branch, weight=None, bias=None, running_mean=None, running_var=None, *,
                     num_branches: int | None = None, training: bool = True,
                     momentum: float | None = 0.1, eps: float = 1e-5,
                     num_batches_tracked=None, input_scale=None, film_gamma=None,
                     film_beta=None, activation=None) -> Tensor:
    """Differentiable reference of fastrobust.functional.multi_batch_norm: u = input_scale·x,
    routed BN of u, then y = act(film_gamma·BN + film_beta)."""
    K = num_branches if num_branches is not None else _infer_k(weight, running_mean)
    acc = acc_dtype(x)
    u = _extras_in(x, input_scale)
    batch_stats = training or running_mean is None
    if batch_stats:
        count, mean, var = branch_moments(u, branch, K)
        if training and running_mean is not None:
            _store(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
    else:
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(acc)
    y = (u - _per_sample(mean, branch, x.dim())) * _per_sample(scale, branch, x.dim())
    if bias is not None:
        y = y + _per_sample(bias.to(acc), branch, x.dim())
    return _extras_out(y, film_gamma, film_beta, activation).to(x.dtype)


def mixed_batch_norm(x, mix, weight=None, bias=None, running_mean=None, running_var=None, *,
                     training: bool = True, momentum: float | None = 0.1, eps: float = 1e-5,
                     num_batches_tracked=None, input_scale=None, film_gamma=None,
                     film_beta=None, activation=None) -> Tensor:
    """Differentiable reference of fastrobust.functional.mixed_batch_norm (docs/math.md):
    y_n = Σ_k mix[n,k]·BN_k(u)_n, BN_k with mix-weighted batch statistics in training."""
    acc = acc_dtype(x)
    K = mix.shape[1]
    m = mix.to(acc)
    u = _extras_in(x, input_scale)
    us = u.flatten(2) if u.dim() > 2 else u[:, :, None]  # [N, C, S]
    S = us.shape[2]
    if training or running_mean is None:
        W = m.sum(0)  # [K]: each branch's weighted sample count
        denom = torch.where(W > 0, W * S, torch.ones_like(W))[:, None]
        mean = torch.einsum("nk,nc->kc", m, us.sum(2)) / denom
        sq = (us[:, None] - mean[None, :, :, None]).square().sum(3)  # [N, K, C]
        var = torch.einsum("nk,nkc->kc", m, sq) / denom
        if training and running_mean is not None:
            _store(running_mean, running_var, num_batches_tracked, mean, var, W.detach() * S,
                   momentum)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    nd = x.dim()

    def chan(t):  # [C] → [1, C, 1, ...]
        return t.to(acc).reshape(1, -1, *([1] * (nd - 2)))

    y = 0
    for k in range(K):
        bn_k = (u - chan(mean[k])) * chan(torch.rsqrt(var[k] + eps))
        if weight is not None:
            bn_k = bn_k * chan(weight[k])
        if bias is not None:
            bn_k = bn_k + chan(bias[k])
        y = y + m[:, k].reshape(-1, *([1] * (nd - 1))) * bn_k
    return _extras_out(y, film_gamma, film_beta, activation).to(x.dtype)


def film(x, gamma=None, beta=None) -> Tensor:
    """Reference of fastrobust.functional.film: y = γ[n,c]·x + β[n,c] ([N, C] or [C])."""
    acc = acc_dtype(x)
    y = x.to(acc)
    for t, op in ((gamma, torch.mul), (beta, torch.add)):
        if t is not None:
            t = t.to(acc)
            y = op(y, t.reshape(1, -1, *([1] * (x.dim() - 2))) if t.dim() == 1
                   else _bc(t, x.dim()))
    return y.to(x.dtype)


def _infer_k(*tensors) -> int:
    for t in tensors:
        if t is not None:
            return t.shape[0]
    raise ValueError("num_branches is needed when weight and running stats are all None")




# --- PGD steps (docs/math.md) ------------------------------------------------------
# Out of place and written as the math reads; eps/alpha are floats or per-sample [N] tensors.

def _strength_view(v, x: Tensor) -> Tensor | float:
    """A float stays a float; an [N] tensor becomes [N, 1, ..., 1] in x's dtype."""
    if isinstance(v, Tensor):
        return v.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
    return v


def _sample_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm, [N, 1, ..., 1], accumulated in fp32 (fp64 for fp64)."""
    n = t.to(acc_dtype(t)).flatten(1).norm(dim=1)
    return n.view((-1,) + (1,) * (t.dim() - 1))


def pgd_step(x_adv: Tensor, grad: Tensor, x_nat: Tensor, eps, alpha, norm: str = "linf",
             clip_min: float = 0.0, clip_max: float = 1.0) -> Tensor:
    """One projected step. linf in torchattacks' order of operations (bitwise in fp32):
        a = x_adv + α·sign(g);  δ = clamp(a − x_nat, −ε, ε);  clamp(x_nat + δ, lo, hi)
    l2:  a = x_adv + α·g/max(‖g_n‖, 1e-12);  δ = a − x_nat;  δ·min(1, ε/‖δ_n‖);  clamp(x_nat + δ)
    (‖δ_n‖ = 0 keeps δ, so ε = 0 leaves a sample at x_nat without a 0/0)."""
    if norm == "linf":  # the raw step with sign(g) as its direction
        return pgd_step_raw(x_adv, grad.sign(), x_nat, eps, alpha, clip_min, clip_max)
    e, a_ = _strength_view(eps, x_adv), _strength_view(alpha, x_adv)
    if norm == "l2":
        step = (grad.to(acc_dtype(grad)) / _sample_norm(grad).clamp_min(1e-12)).to(x_adv.dtype)
        delta = x_adv + a_ * step - x_nat
        dn = _sample_norm(delta)
        e_acc = e.to(dn.dtype) if isinstance(e, Tensor) else e
        factor = torch.where(dn > e_acc, e_acc / dn.clamp_min(1e-30), torch.ones_like(dn))
        delta = delta * factor.to(x_adv.dtype)
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return torch.clamp(x_nat + delta, min=clip_min, max=clip_max)


def mifgsm_step(x_adv: Tensor, grad: Tensor, momentum: Tensor, x_nat: Tensor, eps, alpha,
                decay: float, clip_min: float = 0.0, clip_max: float = 1.0):
    """MI-FGSM: buf = g/mean(|g_n|) + decay·buf (a sample whose gradient is all zero divides
    by 1, so it adds 0; a NaN makes the sample's momentum NaN), then the linf step with
    sign(buf). Returns (x_adv, buf)."""
    mean_abs = grad.to(acc_dtype(grad)).abs().flatten(1).mean(dim=1)
    mean_abs = mean_abs.view((-1,) + (1,) * (grad.dim() - 1))
    divisor = torch.where(mean_abs == 0, torch.ones_like(mean_abs), mean_abs)
    buf = (grad / divisor).to(grad.dtype) + momentum * decay
    return pgd_step(x_adv, buf, x_nat, eps, alpha, "linf", clip_min, clip_max), buf


def pgd_init(x_nat: Tensor, eps, noise: Tensor, radius_u: Tensor | None, norm: str = "linf",
             clip_min: float = 0.0, clip_max: float = 1.0) -> Tensor:
    """The random start from given noise: linf, noise ~ U(−1, 1) per element: x + ε·noise;
    l2, noise ~ N(0, 1) per element and radius_u ~ U(0, 1) per sample: x + ε·u^(1/d)·z/‖z‖.
    Both projected onto the ε-ball and clamped to [clip_min, clip_max]."""
    if norm == "linf":
        return pgd_step_raw(x_nat, noise, x_nat, eps, eps, clip_min, clip_max)
    d = x_nat[0].numel()
    e = eps if isinstance(eps, Tensor) else torch.full_like(radius_u, eps)
    radius = e.to(radius_u.dtype) * radius_u.pow(1.0 / max(d, 1))
    return pgd_step(x_nat, noise, x_nat, eps, radius, "l2", clip_min, clip_max)


def pgd_step_raw(x_adv: Tensor, direction: Tensor, x_nat: Tensor, eps, alpha,
                 clip_min: float, clip_max: float) -> Tensor:
    """The linf step with the direction used as is instead of its sign (the linf random start:
    direction = U(−1, 1) noise, alpha = eps)."""
    e, a_ = _strength_view(eps, x_adv), _strength_view(alpha, x_adv)
    a = x_adv + a_ * direction
    delta = torch.minimum(torch.maximum(a - x_nat, -e), e) if isinstance(e, Tensor) \
        else torch.clamp(a - x_nat, min=-e, max=e)
    return torch.clamp(x_nat + delta, min=clip_min, max=clip_max)
