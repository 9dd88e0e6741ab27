"""FiLM and channel scale, y = γ[n,c]·x + β[n,c], in plain PyTorch: the eager kernels of the
ops film and film_backward (the passes of fastrobust/ops/_eager.py)."""
from __future__ import annotations

import torch

from .._common import acc_dtype
from .._eager import affine, grad_sums


def _film_coefficient(t, x, fill):
    """γ or β as [N, C] in the accumulation type (a [C] one broadcast over the batch)."""
    acc = acc_dtype(x)
    N, C = x.shape[:2]
    if t is None:
        return torch.full((N, C), fill, dtype=acc, device=x.device)
    return t.to(acc).expand(N, C)


@torch.no_grad()
def film(x, gamma, beta):
    """y = γ·x + β with [N, C] or [C] γ, β (either may be None)."""
    return affine(x, _film_coefficient(gamma, x, 1.0), _film_coefficient(beta, x, 0.0), False)


@torch.no_grad()
def film_backward(dy, x, gamma, needs, per_channel):
    """Returns (dx, dgamma, dbeta); an unneeded one is empty. dgamma (dbeta) is [C],
    summed over the batch, when per_channel_gamma (per_channel_beta), else [N, C]."""
    need_x, need_gamma, need_beta = needs
    per_channel_gamma, per_channel_beta = per_channel
    acc = acc_dtype(x)
    N, C = x.shape[:2]
    dx, dgamma, dbeta = (x.new_empty(0, dtype=dt) for dt in (x.dtype, acc, acc))
    if need_x:
        A = _film_coefficient(gamma, x, 1.0)
        dx = affine(dy, A, torch.zeros_like(A), False)
        dx = dx.to(x.dtype)
    if need_gamma or need_beta:
        G1, G2 = grad_sums(dy, x, torch.zeros(N, C, dtype=acc, device=x.device), None, acc)
        dgamma = (G2.sum(0) if per_channel_gamma else G2) if need_gamma else dgamma
        dbeta = (G1.sum(0) if per_channel_beta else G1) if need_beta else dbeta
    return dx, dgamma, dbeta

