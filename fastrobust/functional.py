"""The functional API (docs/math.md, docs/ops.md); the PGD steps live in fastrobust/ops/pgd/
functional.py and are re-exported here.

The batch norms call their registered op (torch.ops.fastrobust.multi_bn) first, whose C++
checks (csrc/checks.h) are the argument checks; only a call the op refuses, or one whose
arguments need converting (an int32 branch, a numpy eps), goes through the Python checks
below, which name the function and the argument the user passed. film, channel_scale and
scale_filters check in Python first, to name their own arguments (scale, omega, weight).
Value checks that would need a host sync on a device (out-of-range branch ids) happen inside
the kernels: at once on CPU, as an asynchronous device assert on CUDA."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .ops._common import FLOATS, shown
from .ops.pgd.functional import mifgsm_step_, pgd_init, pgd_step_
from .ops.add_relu import add_relu as _add_relu

_ops = torch.ops.fastrobust

__all__ = ["multi_batch_norm", "mixed_batch_norm", "film", "channel_scale", "scale_filters",
           "add_relu", "pgd_step_", "mifgsm_step_", "pgd_init"]

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
    if t.dtype not in FLOATS:
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
    if t.dtype not in FLOATS:
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
    if x.dtype not in FLOATS:
        raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")


def _real(op: str, name: str, v) -> float:
    """A plain real number (int, float, numpy scalar; not bool, str or a tensor) as float."""
    if isinstance(v, (bool, str, bytes)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {shown(v)}")
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
        raise TypeError(f"{op}: num_branches must be an int, got {shown(K)}")
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
            (AW-Net's per-sample filter scaling of the preceding bias-free conv, docs/math.md).
        film_gamma, film_beta: ``[N, C]`` or ``[C]``: y = γ·BN(x) + β after the
            normalization (OAT's FiLM, docs/math.md).
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
    """Soft-mixed batch norm (docs/math.md): y_n = Σ_k mix[n,k]·BN_k(x)_n, in one pass.

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
    if mix.dtype not in FLOATS:
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
            if not isinstance(t, Tensor) or (t.dim() == 1 and t.shape[0] != C):
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
    y = _ops.multi_bn.default(x, branch, mix, weight, bias, *work, *extras, K, training,
                              0.0 if cumulative else momentum, cumulative, eps,
                              activation == "relu")[0]
    if work[0] is not stats[0] or work[1] is not stats[1] or work[2] is not stats[2]:
        with torch.no_grad():
            for t, w in zip(stats, work):
                if w is not t:
                    t.copy_(w)
    return y


def film(x: Tensor, gamma: Tensor | None = None, beta: Tensor | None = None) -> Tensor:
    """Feature-wise affine modulation (FiLM, docs/math.md): y = γ[n,c]·x + β[n,c].

    ``gamma`` and ``beta`` are ``[N, C]`` (per sample) or ``[C]``; either may be None.
    Differentiable in x, γ and β. After a batch norm, prefer the fused ``film_gamma`` /
    ``film_beta`` arguments of :func:`multi_batch_norm` (one pass instead of two)."""
    return _film("film", x, gamma, beta)


def _film(op, x, gamma, beta, x_name="x", gamma_name="gamma"):
    """film's checks and op, the messages naming ``op`` and its caller's argument names."""
    _check_x(op, x, x_name)
    g, b = (_per_sample_arg(op, name, t, x, keep_per_channel=True, x_name=x_name)
            for name, t in ((gamma_name, gamma), ("beta", beta)))
    return _ops.film.default(x, g, b)


def channel_scale(x: Tensor, scale: Tensor) -> Tensor:
    """y = scale[n,c]·x with ``scale`` ``[N, C]`` or ``[C]`` (docs/math.md): AW-Net's filter-wise
    scaling of a bias-free conv, applied to its output, since conv(x, ω⊙W) = ω[c]·conv(x, W).
    Before a batch norm, prefer its fused ``input_scale`` (the scaled tensor is never
    written)."""
    if not isinstance(scale, Tensor):
        raise TypeError(f"channel_scale: scale must be a Tensor, got {type(scale).__name__}")
    return _film("channel_scale", x, scale, None, gamma_name="scale")


def scale_filters(weight: Tensor, omega: Tensor) -> Tensor:
    """The weight-side form of filter-wise scaling for a shared ω (docs/math.md): filter m of
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
    return _add_relu(a, b)
