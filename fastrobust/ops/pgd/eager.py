"""The PGD steps in plain PyTorch: the eager kernels of pgd_step, pgd_init and mifgsm_step,
over the update functions `pgd_update` / `mifgsm_update`, which have the signatures of the
compiled kernels (csrc/pgd/math.h) and write into place. Each op runs them on x_adv's flat
layout (a copy where x_adv is not dense per sample, written back after)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._common import PgdMode, acc_dtype, flat_layout, kernel_checks, like
from .schema import init_args, step_mode


def _per_sample_view(t: Tensor | None, v: float, x: Tensor):
    """A per-sample [N] tensor as [N, 1, ..., 1] in x's dtype, else the float."""
    return v if t is None else t.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))


def _sample_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm as [N, 1, ..., 1], accumulated in the accumulation dtype."""
    return t.to(acc_dtype(t)).flatten(1).norm(dim=1).view((-1,) + (1,) * (t.dim() - 1))


@torch.no_grad()
def pgd_update(out, x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, mode, clip_min,
               clip_max) -> None:
    e, a = _per_sample_view(eps_t, eps, x_adv), _per_sample_view(alpha_t, alpha, x_adv)
    if mode == PgdMode.LINF_SIGN:
        direction = grad.sign()
    elif mode == PgdMode.LINF_RAW:
        direction = grad
    elif mode == PgdMode.L2:
        direction = (grad.to(acc_dtype(grad)) / _sample_norm(grad).clamp_min(1e-12)
                     ).to(x_adv.dtype)
    else:
        raise ValueError(f"unknown PGD mode {mode}")
    delta = x_adv + a * direction - x_nat
    if mode == PgdMode.L2:  # onto the l2 ball: δ·min(1, ε/‖δ_n‖)
        dn = _sample_norm(delta)
        e_acc = e.to(dn.dtype) if isinstance(e, Tensor) else e
        factor = torch.where(dn > e_acc, e_acc / dn.clamp_min(1e-30), 1.0)
        delta = delta * factor.to(x_adv.dtype)
    elif isinstance(e, Tensor):
        delta = torch.minimum(torch.maximum(delta, -e), e)
    else:
        delta = torch.clamp(delta, min=-e, max=e)
    result = torch.clamp(x_nat + delta, min=clip_min, max=clip_max)
    if isinstance(e, Tensor) and e.device.type == "cuda":  # as the Triton kernels do
        result = torch.where(e < 0, float("nan"), result)
    out.copy_(result)


@torch.no_grad()
def mifgsm_update(x_adv, grad, buf, x_nat, eps_t, eps, alpha_t, alpha, decay, clip_min,
                  clip_max) -> None:
    mean_abs = grad.to(acc_dtype(grad)).abs().flatten(1).mean(dim=1)
    mean_abs = mean_abs.view((-1,) + (1,) * (grad.dim() - 1))
    buf.copy_((grad / torch.where(mean_abs == 0, 1.0, mean_abs)).to(grad.dtype)
              + buf * decay)
    pgd_update(x_adv, x_adv, buf, x_nat, eps_t, eps, alpha_t, alpha, PgdMode.LINF_SIGN,
               clip_min, clip_max)


def _eps_values(op: str, eps_t: Tensor | None) -> None:
    """A per-sample eps must be >= 0. The op's checks read it on the CPU (csrc/pgd/checks.h)
    and the CUDA kernels make such a sample NaN; on any other device this kernel asserts it
    asynchronously (no host sync)."""
    if eps_t is not None and eps_t.device.type != "cpu" and not kernel_checks(eps_t.device):
        torch._assert_async((eps_t >= 0).all(), f"{op}: eps must be >= 0")


def _flat(t: Tensor) -> Tensor:
    return t if flat_layout(t) else t.contiguous()


def pgd_step(x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, l2, clip_min, clip_max):
    _eps_values("pgd_step_", eps_t)
    work = _flat(x_adv)
    pgd_update(work, work, like(grad, work), like(x_nat, work), eps_t, eps, alpha_t, alpha,
               step_mode(l2), clip_min, clip_max)
    if work is not x_adv:
        x_adv.copy_(work)


def pgd_init(noise, x_nat, eps_t, eps, radius, l2, clip_min, clip_max):
    _eps_values("pgd_init", eps_t)
    work = _flat(noise)
    xn = like(x_nat, work)
    pgd_update(work, xn, work, xn, *init_args(eps_t, eps, radius, l2), clip_min, clip_max)
    if work is not noise:
        noise.copy_(work)


def mifgsm_step(x_adv, grad, momentum, x_nat, eps_t, eps, alpha_t, alpha, decay, clip_min,
                clip_max):
    _eps_values("mifgsm_step_", eps_t)
    work = _flat(x_adv)
    buf = like(momentum, work)
    mifgsm_update(work, like(grad, work), buf, like(x_nat, work), eps_t, eps, alpha_t, alpha,
                  decay, clip_min, clip_max)
    if work is not x_adv:
        x_adv.copy_(work)
    if buf is not momentum:
        momentum.copy_(buf)
