"""The functional API (docs/math.md, docs/ops.md). Each function checks its arguments' metadata
(shapes, dtypes, devices) with clear errors, then calls its registered op in `fastrobust._ops`.
Value checks that would need a host sync on a device (out-of-range branch ids) happen inside
the kernels: at once on CPU, as an asynchronous device assert on CUDA."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import _ops  # the ops' Python side (fake impls, Python kernels)
from ._spec import acc_dtype
from ._common import kernel_checks

__all__ = ["multi_batch_norm", "mixed_batch_norm", "film", "channel_scale", "scale_filters",
           "add_relu", "pgd_step_", "mifgsm_step_", "pgd_init"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_param(op: str, name: str, t: Tensor | None, x: Tensor, K: int) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.shape != (K, x.shape[1]):
        if t.dim() == 2 and t.shape[0] == K:  # the branches agree: x's channels do not
            raise ValueError(f"{op}: x has {x.shape[1]} channels but {name} is "
                             f"[num_branches, C] = {list(t.shape)}: C must match x.shape[1]")
        raise ValueError(f"{op}: {name} must have shape [num_branches, C] = "
                         f"[{K}, {x.shape[1]}], got {list(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _per_sample_arg(op: str, name: str, t: Tensor | None, x: Tensor,
                    keep_per_channel: bool = False, x_name: str = "x") -> Tensor | None:
    """An [N, C] or [C] per-(sample, channel) tensor, returned dense: a [C] one as is with
    ``keep_per_channel`` (the op takes it and sums its gradient over the batch itself), else
    broadcast to [N, C] (autograd then sums its gradient back). ``x_name``: what the caller
    of ``op`` calls x, for the messages."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
    N, C = x.shape[:2]
    if t.shape not in ((N, C), (C,)):
        raise ValueError(f"{op}: {name} must have shape [N, C] = [{N}, {C}] or [C] = [{C}], "
                         f"got {list(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {x_name} is on {x.device}")
    if t.dim() == 1 and not keep_per_channel:
        t = t.expand(N, C)
    return t.contiguous()


def _check_x(op: str, x, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{op}: {name} must be [N, C, *spatial], got shape {list(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")


def _shown(v) -> str:
    """A value for a one-line message: its type, and a short repr (a tensor's or an array's
    shape instead of its multi-line repr)."""
    shape = getattr(v, "shape", None)
    if shape is not None:
        return f"{type(v).__name__} of shape {list(shape)}"
    r = " ".join(repr(v).split())
    return f"{type(v).__name__} {r if len(r) <= 40 else r[:37] + '...'}"


def _real(op: str, name: str, v) -> float:
    """A plain real number (int, float, numpy scalar; not bool, str or a tensor) as float."""
    if isinstance(v, (bool, str, bytes)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {_shown(v)}")
    return float(v)


def _check_eps_momentum(op: str, eps, momentum) -> tuple[float, float | None]:
    e = _real(op, "eps", eps)
    if not (e > 0 and math.isfinite(e)):
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps}")
    if momentum is None:
        return e, None
    m = _real(op, "momentum", momentum)
    if not 0 <= m <= 1:
        raise ValueError(f"{op}: momentum must be in [0, 1] or None, got {momentum}")
    return e, m


def _check_bn_args(op, x, K, weight, bias, running_mean, running_var, momentum,
                   num_batches_tracked, training, activation):
    if isinstance(K, bool) or not isinstance(K, numbers.Integral):
        raise TypeError(f"{op}: num_branches must be an int, got {_shown(K)}")
    if K < 1:
        raise ValueError(f"{op}: num_branches must be >= 1, got {K}")
    if not isinstance(training, (bool, numbers.Integral)):
        raise TypeError(f"{op}: training must be a bool, got {type(training).__name__}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_param(op, name, t, x, K)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: pass both running_mean and running_var, or neither")
    if num_batches_tracked is not None:
        if not isinstance(num_batches_tracked, Tensor):
            raise TypeError(f"{op}: num_batches_tracked must be an int64 [{K}] Tensor or None, "
                            f"got {type(num_batches_tracked).__name__}")
        if num_batches_tracked.shape != (K,) or num_batches_tracked.dtype != torch.int64:
            raise ValueError(f"{op}: num_batches_tracked must be int64 [{K}], got "
                             f"{num_batches_tracked.dtype} {list(num_batches_tracked.shape)}")
    elif momentum is None and training and running_mean is not None:
        raise ValueError(f"{op}: momentum=None (cumulative average) needs num_batches_tracked")
    if activation not in (None, "relu"):
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")


def multi_batch_norm(x: Tensor, branch: Tensor, weight: Tensor | None = None,
                     bias: Tensor | None = None, running_mean: Tensor | None = None,
                     running_var: Tensor | None = None, *, training: bool = False,
                     momentum: float | None = 0.1, eps: float = 1e-5,
                     num_branches: int | None = None,
                     num_batches_tracked: Tensor | None = None,
                     input_scale: Tensor | None = None, film_gamma: Tensor | None = None,
                     film_beta: Tensor | None = None, activation: str | None = None) -> Tensor:
    """Sample-routed batch norm: sample n is normalized by branch ``branch[n]``'s statistics
    and affine parameters (dual BN is K=2, K-way BN any K; docs/math.md).

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
        input_scale: ``[N, C]`` or ``[C]``: x is multiplied by it *before* the statistics
            (AW-Net's per-sample filter scaling of the preceding bias-free conv, DESIGN §2.4).
        film_gamma, film_beta: ``[N, C]`` or ``[C]``: y = γ·BN(x) + β after the
            normalization (OAT's FiLM, DESIGN §2.3).
        activation: None or ``"relu"``, applied last.

    Everything is one pass over x forward and one backward; the scaled input and the
    pre-FiLM / pre-ReLU tensors are never written to memory. Statistics accumulate in fp32
    (fp64 for fp64 inputs); the output has x's dtype. Differentiable in x, weight, bias and the
    extras.
    """
    fast = _fast_bn(x, branch, weight, bias, running_mean, running_var, num_batches_tracked,
                    (input_scale, film_gamma, film_beta), num_branches, training, momentum, eps,
                    activation, False)
    return _fast_or_checked(fast, _multi_batch_norm_checked, x, branch, weight, bias,
                            running_mean, running_var, training, momentum, eps, num_branches,
                            num_batches_tracked, input_scale, film_gamma, film_beta, activation)


def _multi_batch_norm_checked(x, branch, weight, bias, running_mean, running_var, training,
                              momentum, eps, num_branches, num_batches_tracked, input_scale,
                              film_gamma, film_beta, activation, check_only=False):
    """multi_batch_norm's arguments checked one by one in Python, with messages in its words,
    and converted (an int32 branch, a numpy eps, ...): the path of unusual arguments, and the
    diagnosis of an argument the op refused."""
    op = "multi_batch_norm"
    _check_x(op, x)
    if not isinstance(branch, Tensor):
        raise TypeError(f"{op}: branch must be a Tensor, got {type(branch).__name__}")
    if branch.dtype.is_floating_point or branch.dtype.is_complex or branch.dtype == torch.bool:
        raise TypeError(f"{op}: branch must be an integer tensor (int64), got {branch.dtype}")
    if branch.shape != (x.shape[0],):
        raise ValueError(f"{op}: branch must have shape [N] = [{x.shape[0]}], "
                         f"got {list(branch.shape)}")
    if branch.device != x.device:
        raise ValueError(f"{op}: branch is on {branch.device} but x is on {x.device}")
    K = num_branches
    for t in (weight, bias, running_mean, running_var):
        if K is None and isinstance(t, Tensor) and t.dim() >= 1:
            K = t.shape[0]
    if K is None:
        raise ValueError(f"{op}: pass num_branches when weight, bias and running stats are "
                         "all None")
    _check_bn_args(op, x, K, weight, bias, running_mean, running_var, momentum,
                   num_batches_tracked, training, activation)
    eps, momentum = _check_eps_momentum(op, eps, momentum)
    extras = [_per_sample_arg(op, n, t, x) for n, t in (
        ("input_scale", input_scale), ("film_gamma", film_gamma), ("film_beta", film_beta))]
    if check_only:
        return None
    return _batch_norm(x, branch.long(), weight, bias, running_mean, running_var,
                       num_batches_tracked, extras, K, bool(training), momentum, eps,
                       activation, False)


def mixed_batch_norm(x: Tensor, mix: Tensor, weight: Tensor | None = None,
                     bias: Tensor | None = None, running_mean: Tensor | None = None,
                     running_var: Tensor | None = None, *, training: bool = False,
                     momentum: float | None = 0.1, eps: float = 1e-5,
                     num_batches_tracked: Tensor | None = None,
                     input_scale: Tensor | None = None, film_gamma: Tensor | None = None,
                     film_beta: Tensor | None = None, activation: str | None = None) -> Tensor:
    """Soft-mixed batch norm (DESIGN §2.2): y_n = Σ_k mix[n,k]·BN_k(x)_n, in one pass.

    AW-Net's MixBN at test time, (1-P)·BN_adv + P·BN_nat, and AFA's weight-generator mixing of
    two branches are K=2 instances.

    Args:
        x: ``[N, C, *spatial]``, any memory format.
        mix: float ``[N, K]`` mixing weights; rows need not sum to 1. In training (batch
            statistics) they must be >= 0: branch k's statistics are mix-weighted over the
            batch, μ_k = Σ_n mix_nk Σ_s x / (S·Σ_n mix_nk), the variance likewise.
        weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps: as in
            :func:`multi_batch_norm`; a branch's running stats are updated when its weighted
            count S·Σ_n mix_nk is at least 2.
        input_scale, film_gamma, film_beta, activation: the fused extras of
            :func:`multi_batch_norm`.

    With a one-hot ``mix`` it equals :func:`multi_batch_norm` with the matching ``branch``
    (forward, gradients and running stats). Differentiable in x, mix, weight, bias and the
    extras, in training and in eval.
    """
    fast = _fast_bn(x, mix, weight, bias, running_mean, running_var, num_batches_tracked,
                    (input_scale, film_gamma, film_beta), None, training, momentum, eps,
                    activation, True)
    return _fast_or_checked(fast, _mixed_batch_norm_checked, x, mix, weight, bias,
                            running_mean, running_var, training, momentum, eps,
                            num_batches_tracked, input_scale, film_gamma, film_beta, activation)


def _fast_or_checked(fast, checked, *args):
    """The op on `fast` (`_fast_bn`'s arguments) when there are some; a call the op refuses is
    diagnosed by `checked(*args)` in the public function's words (else the op's own error
    stands). Without them, `checked(*args)` converts and checks, then calls the op."""
    if fast is not None:
        try:
            return _batch_norm(*fast)
        except Exception:
            checked(*args, check_only=True)
            raise
    return checked(*args)


def _mixed_batch_norm_checked(x, mix, weight, bias, running_mean, running_var, training,
                              momentum, eps, num_batches_tracked, input_scale, film_gamma,
                              film_beta, activation, check_only=False):
    """mixed_batch_norm's arguments checked one by one (see _multi_batch_norm_checked)."""
    op = "mixed_batch_norm"
    _check_x(op, x)
    if not isinstance(mix, Tensor):
        raise TypeError(f"{op}: mix must be a Tensor, got {type(mix).__name__}")
    if mix.dim() != 2 or mix.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: mix must have shape [N, K] with N = {x.shape[0]}, "
                         f"got {list(mix.shape)}")
    if mix.dtype not in _FLOATS:
        raise TypeError(f"{op}: mix must be a floating-point tensor, got {mix.dtype}")
    if mix.device != x.device:
        raise ValueError(f"{op}: mix is on {mix.device} but x is on {x.device}")
    K = mix.shape[1]
    _check_bn_args(op, x, K, weight, bias, running_mean, running_var, momentum,
                   num_batches_tracked, training, activation)
    eps, momentum = _check_eps_momentum(op, eps, momentum)
    extras = [_per_sample_arg(op, n, t, x) for n, t in (
        ("input_scale", input_scale), ("film_gamma", film_gamma), ("film_beta", film_beta))]
    if check_only:
        return None
    return _batch_norm(x, mix, weight, bias, running_mean, running_var, num_batches_tracked,
                       extras, K, bool(training), momentum, eps, activation, True)


def _fast_bn(x, route, weight, bias, running_mean, running_var, num_batches_tracked, extras,
             num_branches, training, momentum, eps, activation, mixed):
    """The arguments of `_batch_norm` when every one is already in its canonical form (tensors,
    an int64 branch, float eps and momentum, bool training): the op's own checks (in C++, as
    for every kernel) are then all there is to run. None: take the checked path."""
    if not (type(eps) is float and (momentum is None or type(momentum) is float)
            and (training is True or training is False)
            and (activation is None or activation == "relu") and isinstance(x, Tensor)
            and isinstance(route, Tensor) and (mixed or route.dtype == torch.int64)):
        return None
    K = route.shape[1] if mixed else num_branches
    if K is None:
        for t in (weight, bias, running_mean, running_var):
            if isinstance(t, Tensor) and t.dim() >= 1:
                K = t.shape[0]
                break
        else:
            return None
    if x.dim() < 2:
        return None
    N, C = x.shape[0], x.shape[1]
    ext = []
    for t in extras:
        if t is not None:
            if not isinstance(t, Tensor):
                return None
            t = (t.expand(N, C) if t.dim() == 1 else t).contiguous()
        ext.append(t)
    return (x, route, weight, bias, running_mean, running_var, num_batches_tracked, ext, K,
            training, momentum, eps, activation, mixed)


def _batch_norm(x, route, weight, bias, running_mean, running_var, num_batches_tracked, extras,
                K, training, momentum, eps, activation, mixed):
    """The registered op on dense small tensors: a non-contiguous weight, bias or mix (all
    legal) is made contiguous (a differentiable copy of a [K, C] / [N, K] tensor). The CPU
    kernels update running statistics as contiguous tensors: a non-contiguous one is updated
    through a contiguous copy written back into the caller's tensor. The kernels of other
    devices (Triton on CUDA, the eager ones) read and write the running mean and variance
    through their strides, with no copy."""
    route, weight, bias = (None if t is None else t.contiguous() for t in (route, weight, bias))
    stats = (running_mean, running_var, num_batches_tracked)
    strided = x.device.type != "cpu"
    work = [None if t is None else t if strided and i < 2 else t.contiguous()
            for i, t in enumerate(stats)]
    cumulative = momentum is None
    branch, mix = (None, route) if mixed else (route, None)
    y = _ops.batch_norm(x, branch, mix, weight, bias, *work, *extras, K, training,
                        0.0 if cumulative else momentum, cumulative, eps, activation == "relu")
    if work[0] is not stats[0] or work[1] is not stats[1] or work[2] is not stats[2]:
        with torch.no_grad():
            for t, w in zip(stats, work):
                if w is not t:
                    t.copy_(w)
    return y


def film(x: Tensor, gamma: Tensor | None = None, beta: Tensor | None = None) -> Tensor:
    """Feature-wise affine modulation (FiLM, DESIGN §2.3): y = γ[n,c]·x + β[n,c].

    ``gamma`` and ``beta`` are ``[N, C]`` (per sample) or ``[C]``; either may be None.
    Differentiable in x, γ and β. After a batch norm, prefer the fused ``film_gamma`` /
    ``film_beta`` arguments of :func:`multi_batch_norm` (one pass instead of two)."""
    return _film("film", x, gamma, beta)


def _film(op, x, gamma, beta, x_name="x", gamma_name="gamma"):
    """film's checks and op, the messages naming ``op`` and its caller's argument names."""
    _check_x(op, x, x_name)
    g, b = (_per_sample_arg(op, name, t, x, keep_per_channel=True, x_name=x_name)
            for name, t in ((gamma_name, gamma), ("beta", beta)))
    return _ops.film(x, g, b)


def channel_scale(x: Tensor, scale: Tensor) -> Tensor:
    """y = scale[n,c]·x with ``scale`` ``[N, C]`` or ``[C]`` (DESIGN §2.4): AW-Net's filter-wise
    scaling of a bias-free conv, applied to its output, since conv(x, ω⊙W) = ω[c]·conv(x, W).
    Before a batch norm, prefer its fused ``input_scale`` (the scaled tensor is never
    written)."""
    if not isinstance(scale, Tensor):
        raise TypeError(f"channel_scale: scale must be a Tensor, got {type(scale).__name__}")
    return _film("channel_scale", x, scale, None, gamma_name="scale")


def scale_filters(weight: Tensor, omega: Tensor) -> Tensor:
    """The weight-side form of filter-wise scaling for a shared ω (DESIGN §2.4): filter m of
    ``weight`` ``[C_out, ...]`` times ``omega[m]`` (``[C_out]``). Differentiable in both."""
    op = "scale_filters"
    for name, t in (("weight", weight), ("omega", omega)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if weight.dim() < 1:
        raise ValueError(f"{op}: weight must be [C_out, ...], got a 0-dim tensor")
    if omega.shape != (weight.shape[0],):
        raise ValueError(f"{op}: omega must have shape [C_out] = [{weight.shape[0]}], "
                         f"got {list(omega.shape)}")
    # As a [1, C_out, ...] activation, the filters are the channels.
    w = weight.unsqueeze(0)
    return _film(op, w, omega, None, x_name="weight", gamma_name="omega").squeeze(0)


def add_relu(a: Tensor, b: Tensor) -> Tensor:
    """relu(a + b), a ResNet block's residual junction, as one pass each way on the CPU (one
    read of a and b, one write; the backward is one masked pass that serves both inputs).
    Equal to ``torch.relu(a + b)`` bitwise, first and second derivatives included; inputs that
    broadcast, differ in dtype or device, or run under torch.compile (which fuses the pair
    itself) take the two plain ops."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"add_relu: {name} must be a Tensor, got {type(t).__name__}")
    return _ops.add_relu(a, b)


# --- PGD steps (DESIGN §2.5) ------------------------------------------------------------------

def _check_adv(op: str, name: str, t, ref: Tensor | None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    if ref is None:
        if t.dim() < 1:
            raise ValueError(f"{op}: {name} must be [N, ...], got a 0-dim tensor")
        return
    if t.shape != ref.shape:
        raise ValueError(f"{op}: {name} has shape {list(t.shape)} but x_adv has "
                         f"{list(ref.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} is {t.dtype} but x_adv is {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x_adv is on {ref.device}")


def _strength(op: str, name: str, v, x: Tensor, nonnegative: bool, x_name: str):
    """A float or a per-sample [N] (or 0-dim) tensor → (tensor in the accumulation dtype or
    None, float). Negative eps is an error: at once on CPU, a device assert elsewhere.
    ``x_name``: what ``op`` calls x (x_adv, x_nat), for the messages."""
    if isinstance(v, Tensor):
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] != x.shape[0]):
            raise ValueError(f"{op}: a tensor {name} must be per sample, shape [N] = "
                             f"[{x.shape[0]}], got {list(v.shape)}")
        if not v.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be floating point, got {v.dtype}")
        if v.device != x.device:
            raise ValueError(f"{op}: {name} is on {v.device} but {x_name} is on {x.device}")
        t = v.detach().to(acc_dtype(x)).expand(x.shape[0]).contiguous()
        if nonnegative:
            ok = None if kernel_checks(t.device) else (t >= 0).all()
            if t.device.type == "cpu":
                if not bool(ok):
                    raise ValueError(f"{op}: {name} must be >= 0, got {t.min().item()}")
            elif ok is not None:
                torch._assert_async(ok, f"{op}: {name} must be >= 0")
            # on CUDA the kernels check it: a sample with eps < 0 comes out NaN (no sync)
        return t, 0.0
    if isinstance(v, (bool, str, bytes)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float or a per-sample tensor, "
                        f"got {_shown(v)}")
    f = float(v)
    if f != f or f in (float("inf"), float("-inf")) or (nonnegative and f < 0):
        raise ValueError(f"{op}: {name} must be a finite{' non-negative' if nonnegative else ''}"
                         f" number, got {v}")
    return None, f


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
    raise TypeError(f"{op}: {name} must be a number, got {_shown(v)}")


def _check_clip(op: str, clip_min: float, clip_max: float) -> tuple[float, float]:
    lo, hi = _bound(op, "clip_min", clip_min), _bound(op, "clip_max", clip_max)
    if not lo <= hi:
        raise ValueError(f"{op}: clip_min ({lo}) must be <= clip_max ({hi})")
    return lo, hi


def pgd_step_(x_adv: Tensor, grad: Tensor, x_nat: Tensor, eps, alpha, *, norm: str = "linf",
              clip_min: float = 0.0, clip_max: float = 1.0) -> Tensor:
    """One projected-gradient ascent step, in place on ``x_adv`` (DESIGN §2.5).

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
    _check_adv(op, "x_adv", x_adv, None)
    _check_adv(op, "grad", grad, x_adv)
    _check_adv(op, "x_nat", x_nat, x_adv)
    if norm not in ("linf", "l2"):
        raise ValueError(f"{op}: norm must be 'linf' or 'l2', got {norm!r}")
    eps_t, e = _strength(op, "eps", eps, x_adv, True, "x_adv")
    alpha_t, a = _strength(op, "alpha", alpha, x_adv, False, "x_adv")
    lo, hi = _check_clip(op, clip_min, clip_max)
    with torch.no_grad():
        _ops.pgd_step(x_adv, grad, x_nat, eps_t, e, alpha_t, a, norm == "l2", lo, hi)
    _mutated(x_adv)
    return x_adv


def mifgsm_step_(x_adv: Tensor, grad: Tensor, momentum_buf: Tensor, x_nat: Tensor, eps, alpha,
                 decay: float = 1.0, *, clip_min: float = 0.0, clip_max: float = 1.0) -> Tensor:
    """One MI-FGSM step, in place on ``x_adv`` and ``momentum_buf`` (DESIGN §2.5)::

        buf ← g/mean(|g_n|) + decay·buf;  then the linf step of :func:`pgd_step_` with sign(buf)

    A sample whose gradient is all zero adds nothing to its momentum (instead of 0/0). eps,
    alpha: floats or per-sample ``[N]`` tensors. Returns ``x_adv``."""
    op = "mifgsm_step_"
    _check_adv(op, "x_adv", x_adv, None)
    for name, t in (("grad", grad), ("momentum_buf", momentum_buf), ("x_nat", x_nat)):
        _check_adv(op, name, t, x_adv)
    eps_t, e = _strength(op, "eps", eps, x_adv, True, "x_adv")
    alpha_t, a = _strength(op, "alpha", alpha, x_adv, False, "x_adv")
    _, d = _strength(op, "decay", decay, x_adv, False, "x_adv")
    lo, hi = _check_clip(op, clip_min, clip_max)
    with torch.no_grad():
        _ops.mifgsm_step(x_adv, grad, momentum_buf, x_nat, eps_t, e, alpha_t, a, d, lo, hi)
    _mutated(x_adv, momentum_buf)
    return x_adv


def pgd_init(x_nat: Tensor, eps, *, norm: str = "linf", clip_min: float = 0.0,
             clip_max: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """A random start in the ε-ball around ``x_nat`` (DESIGN §2.5), as a new tensor in
    ``x_nat``'s layout: linf ``x + U(−ε, ε)`` per element; l2 a uniform direction at radius
    ``ε·u^(1/d)`` (uniform in the ball); then clamped to ``[clip_min, clip_max]``.

    The random numbers come from torch's generator (``generator``, else the default one of
    the device), so the same generator state gives the same start on every backend; the
    kernel then turns them into the start point in place (one more read and write of the noise
    than a kernel-side generator would need: this runs once per attack, not per step)."""
    op = "pgd_init"
    _check_adv(op, "x_nat", x_nat, None)
    if norm not in ("linf", "l2"):
        raise ValueError(f"{op}: norm must be 'linf' or 'l2', got {norm!r}")
    eps_t, e = _strength(op, "eps", eps, x_nat, True, "x_nat")
    lo, hi = _check_clip(op, clip_min, clip_max)
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
        _ops.pgd_init(noise, x_nat, eps_t, e, radius, norm == "l2", lo, hi)
    return noise
