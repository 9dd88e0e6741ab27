"""The public PGD steps (re-exported by fastrobust.functional): each converts its strengths
and clip bounds, calls its registered op, whose checks (csrc/pgd/checks.h) are the argument
checks, and rewords the op's error to name the function the user called (docs/math.md)."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ... import _C
from .._common import acc_dtype, in_words_of, shown

_ops = torch.ops.fastrobust


def _strength(op: str, name: str, v, x):
    """A float or a per-sample [N] (or 0-dim) tensor → (tensor in the accumulation dtype or
    None, float), as the op takes it. Only the Python type is checked here (the schema's
    parser would take a bool as a float); the values and a tensor's shape, dtype and device
    are the op's to check (a tensor that cannot be converted is passed as it is, for the op to
    refuse)."""
    if isinstance(v, Tensor):
        if (isinstance(x, Tensor) and x.dim() >= 1 and v.dtype.is_floating_point
                and v.device == x.device and v.shape in ((), (x.shape[0],))):
            return v.detach().to(acc_dtype(x)).expand(x.shape[0]).contiguous(), 0.0
        return v, 0.0
    if isinstance(v, (bool, str, bytes)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float or a per-sample tensor, "
                        f"got {shown(v)}")
    return None, float(v)


def _call(op: str, fn, *args):
    """``fn(*args)``, the op's error naming the public function ``op``."""
    try:
        with torch.no_grad():
            return fn(*args)
    except (RuntimeError, TypeError, ValueError) as e:
        raise in_words_of(op, e) from None


def _mutated(*tensors: Tensor) -> None:
    """Bumps the version counters of tensors an op wrote in place, so autograd refuses a
    backward through a graph that saved their old values (as for any in-place torch op)."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _bound(op: str, name: str, v) -> float:
    """A clip bound: anything float() takes (a number, a one-element tensor) but a bool or a
    string, as float."""
    if not isinstance(v, (bool, str, bytes)):
        try:
            return float(v)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{op}: {name} must be a number, got {shown(v)}")


def _clip(op: str, clip_min, clip_max) -> tuple[float, float]:
    return _bound(op, "clip_min", clip_min), _bound(op, "clip_max", clip_max)


def pgd_step_(x_adv: Tensor, grad: Tensor, x_nat: Tensor, eps, alpha, *, norm: str = "linf",
              clip_min: float = 0.0, clip_max: float = 1.0) -> Tensor:
    """One projected-gradient ascent step, in place on ``x_adv`` (docs/math.md).

    linf (torchattacks' order of operations, bitwise equal to it in fp32)::

        a = x_adv + α·sign(g);  δ = clamp(a − x_nat, −ε, ε);  x_adv ← clamp(x_nat + δ, lo, hi)

    l2: ``a = x_adv + α·g/max(‖g_n‖₂, 1e-12)``; ``δ = a − x_nat`` scaled by
    ``min(1, ε/‖δ_n‖₂)``; ``x_adv ← clamp(x_nat + δ, lo, hi)``.

    Args:
        x_adv: ``[N, ...]`` current adversarial examples, updated in place (a leaf that
            requires grad is fine: the update is not recorded by autograd).
        grad: the loss gradient w.r.t. ``x_adv``; x_nat: the clean inputs. Same shape and dtype.
        eps, alpha: floats or per-sample ``[N]`` tensors. ``eps = 0`` leaves a sample at
            ``x_nat``, so clean and attacked samples, or several strengths, share one batch.
        norm: ``"linf"`` or ``"l2"``; clip_min, clip_max: the valid input range.

    One read of each input and one write per element (linf); no host sync. On CUDA (Triton)
    each tensor is addressed through its own strides: contiguous, channels_last, slices and
    mixed layouts (x_adv a strided view, updated in place) cost no copy. Returns ``x_adv``.
    """
    op = "pgd_step_"
    if norm not in ("linf", "l2"):
        raise ValueError(f"{op}: norm must be 'linf' or 'l2', got {norm!r}")
    eps_t, e = _strength(op, "eps", eps, x_adv)
    alpha_t, a = _strength(op, "alpha", alpha, x_adv)
    lo, hi = _clip(op, clip_min, clip_max)
    _call(op, _ops.pgd_step.default, x_adv, grad, x_nat, eps_t, e, alpha_t, a, norm == "l2",
          lo, hi)
    _mutated(x_adv)
    return x_adv


def mifgsm_step_(x_adv: Tensor, grad: Tensor, momentum_buf: Tensor, x_nat: Tensor, eps, alpha,
                 decay: float = 1.0, *, clip_min: float = 0.0, clip_max: float = 1.0) -> Tensor:
    """One MI-FGSM step, in place on ``x_adv`` and ``momentum_buf`` (docs/math.md)::

        buf ← g/mean(|g_n|) + decay·buf;  then the linf step of :func:`pgd_step_` with sign(buf)

    A sample whose gradient is all zero adds nothing to its momentum (instead of 0/0). eps,
    alpha: floats or per-sample ``[N]`` tensors. Returns ``x_adv``."""
    op = "mifgsm_step_"
    eps_t, e = _strength(op, "eps", eps, x_adv)
    alpha_t, a = _strength(op, "alpha", alpha, x_adv)
    if isinstance(decay, (bool, str, bytes)) or not isinstance(decay, numbers.Real):
        raise TypeError(f"{op}: decay must be a float, got {shown(decay)}")
    lo, hi = _clip(op, clip_min, clip_max)
    _call(op, _ops.mifgsm_step.default, x_adv, grad, momentum_buf, x_nat, eps_t, e, alpha_t, a,
          float(decay), lo, hi)
    _mutated(x_adv, momentum_buf)
    return x_adv


def pgd_init(x_nat: Tensor, eps, *, norm: str = "linf", clip_min: float = 0.0,
             clip_max: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """A random start in the ε-ball around ``x_nat`` (docs/math.md), as a new tensor in
    ``x_nat``'s layout: linf ``x + U(−ε, ε)`` per element; l2 a uniform direction at radius
    ``ε·u^(1/d)`` (uniform in the ball); then clamped to ``[clip_min, clip_max]``.

    The random numbers come from torch's generator (``generator``, else the default one of
    the device), so the same generator state gives the same start on every backend; the
    kernel then turns them into the start point in place (one more read and write of the noise
    than a kernel-side generator would need: this runs once per attack, not per step)."""
    op = "pgd_init"
    if norm not in ("linf", "l2"):
        raise ValueError(f"{op}: norm must be 'linf' or 'l2', got {norm!r}")
    eps_t, e = _strength(op, "eps", eps, x_nat)
    lo, hi = _clip(op, clip_min, clip_max)
    # The op's checks before the noise is drawn (x_nat standing in for it), so a refused call
    # leaves the generator as it was.
    _call(op, _C._check, "fastrobust::pgd_init", x_nat, x_nat, eps_t, e, None, False, lo, hi)
    with torch.no_grad():
        noise = torch.empty_like(x_nat)
        radius = None
        if norm == "linf":
            noise.uniform_(-1.0, 1.0, generator=generator)
        else:
            noise.normal_(generator=generator)
            u = torch.rand(x_nat.shape[0], generator=generator, device=x_nat.device,
                           dtype=acc_dtype(x_nat))
            d = max(x_nat[0].numel() if x_nat.shape[0] else 1, 1)
            radius = u.pow(1.0 / d) * (eps_t if eps_t is not None else e)
        _ops.pgd_init.default(noise, x_nat, eps_t, e, radius, norm == "l2", lo, hi)
    return noise
