"""The ops' schema implemented over a backend's kernel functions, for the backends written in
Python (eager, Triton). A backend provides `bn_forward` / `bn_backward` / `film_forward` /
`film_backward` (the argument order of fastrobust._engine.Engine) and `pgd_update` /
`mifgsm_update` (that of csrc/cpu/pgd.h); `implementations(...)` turns them into one function
per op with exactly the op's schema (csrc/ops.cpp), ready to register for a dispatch key."""
from __future__ import annotations

import torch
from torch import Tensor

from .._spec import PgdMode


def flat_layout(t: Tensor) -> bool:
    """Dense, with each sample one block of memory (contiguous, channels_last, ...): the
    layout the PGD kernels walk as a flat [N, S] array."""
    if t.numel() == 0 or t.dim() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return t.shape[0] == 1 or t.stride(0) == t.numel() // t.shape[0]


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """t in ref's layout: t itself when the strides already agree, else a copy."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref).copy_(t)


def checked(impls: dict) -> dict:
    """Each function runs the op's argument checks (csrc/checks.h, the ones the C++ kernels
    run) before anything else: also the values of a per-sample eps on CPU tensors (a check
    on the host that makes no data for the kernels, so it does not stop a recorded plan)."""
    from .. import _C
    from ..kernels._plan import host_check

    def wrap(name, fn):
        qual = f"fastrobust::{name}"

        def run(*args):
            with host_check():
                _C._check(qual, *args)
            return fn(*args)
        run.__name__ = name
        return run
    return {name: wrap(name, fn) for name, fn in impls.items()}


def implementations(bn, pgd, film=None) -> dict:
    """{op name: function with the op's schema}; `bn()` / `pgd()` / `film()` (default:
    `bn`) return the kernel objects (called at each use, so a backend can import them
    lazily)."""
    film_kernels = film or bn

    def multi_bn(x, branch, mix, weight, bias, running_mean, running_var, num_batches_tracked,
                 input_scale, film_gamma, film_beta, num_branches, training, momentum,
                 cumulative, eps, relu):
        y, mean, invstd, new_mean, new_var, new_nbt, planes = bn().bn_forward(
            x, branch, mix, weight, bias, running_mean, running_var, num_batches_tracked,
            input_scale, film_gamma, film_beta, num_branches, training, momentum, cumulative,
            eps, relu)
        # (new_mean None: the backend updated the running stats in place itself)
        if (training and running_mean is not None and running_var is not None
                and new_mean is not None):
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
            if num_batches_tracked is not None and new_nbt.numel():
                num_batches_tracked.copy_(new_nbt)
        return y, mean, invstd, planes

    def multi_bn_backward(dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale,
                          film_gamma, film_beta, num_branches, batch_stats, relu, needs):
        # a gradient asked for an argument that is None is none (as the C++ kernels do)
        needs = [bool(n) and (t is not None or i in (0, 2, 3)) for i, (n, t) in enumerate(
            zip(needs, (x, mix, weight, bias, input_scale, film_gamma, film_beta)))]
        grads = bn().bn_backward(dy, x, branch, mix, weight, bias, mean, invstd, planes,
                                 input_scale, film_gamma, film_beta, num_branches, batch_stats,
                                 relu, tuple(needs))
        return tuple(g if g is not None else x.new_empty(0) for g in grads)

    def film(x, gamma, beta):
        return film_kernels().film_forward(x, gamma, beta)

    def film_backward(dy, x, gamma, needs, per_channel):
        return tuple(film_kernels().film_backward(dy, x, gamma, *needs, *per_channel))

    def add_relu(a, b):
        return torch.relu(a + b)

    # A kernel module with STRIDED = True takes every tensor in its own layout (the Triton
    # kernels: strides, no copy); the others get x_adv's flat layout (copies where needed).
    def strided():
        return getattr(pgd(), "STRIDED", False)

    def pgd_step(x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, l2, clip_min, clip_max):
        if strided():
            return pgd().pgd_update(x_adv, x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha,
                                    PgdMode.L2 if l2 else PgdMode.LINF_SIGN, clip_min, clip_max)
        work = x_adv if flat_layout(x_adv) else x_adv.contiguous()
        pgd().pgd_update(work, work, _like(grad, work), _like(x_nat, work), eps_t, eps, alpha_t,
                         alpha, PgdMode.L2 if l2 else PgdMode.LINF_SIGN, clip_min, clip_max)
        if work is not x_adv:
            x_adv.copy_(work)

    def pgd_init(noise, x_nat, eps_t, eps, radius, l2, clip_min, clip_max):
        if l2:
            args = (eps_t, eps, radius, 0.0, PgdMode.L2)
        else:
            args = (eps_t, eps, eps_t, eps, PgdMode.LINF_RAW)
        if strided():
            return pgd().pgd_update(noise, x_nat, noise, x_nat, *args, clip_min, clip_max)
        work = noise if flat_layout(noise) else noise.contiguous()
        xn = _like(x_nat, work)
        pgd().pgd_update(work, xn, work, xn, *args, clip_min, clip_max)
        if work is not noise:
            noise.copy_(work)

    def mifgsm_step(x_adv, grad, momentum, x_nat, eps_t, eps, alpha_t, alpha, decay, clip_min,
                    clip_max):
        if strided():
            return pgd().mifgsm_update(x_adv, grad, momentum, x_nat, eps_t, eps, alpha_t, alpha,
                                       decay, clip_min, clip_max)
        work = x_adv if flat_layout(x_adv) else x_adv.contiguous()
        buf = _like(momentum, work)
        pgd().mifgsm_update(work, _like(grad, work), buf, _like(x_nat, work), eps_t, eps,
                            alpha_t, alpha, decay, clip_min, clip_max)
        if work is not x_adv:
            x_adv.copy_(work)
        if buf is not momentum:
            momentum.copy_(buf)

    return checked({"multi_bn": multi_bn, "multi_bn_backward": multi_bn_backward,
                    "film": film, "film_backward": film_backward, "add_relu": add_relu,
                    "pgd_step": pgd_step, "pgd_init": pgd_init, "mifgsm_step": mifgsm_step})
