"""The functional API (docs/math.md, docs/ops.md); the PGD steps live in fastrobust/ops/pgd/
functional.py and are re-exported here.

Every function calls its registered op (torch.ops.fastrobust.multi_bn, film), whose C++
checks (csrc/<family>/checks.h) are the argument checks, and only rewords the op's error to
name the function and the argument the user called (channel_scale's scale is film's gamma).
What is checked here is what the op cannot see: the Python types of the scalar arguments
(the schema's parser would take a bool or a tensor as a number), which route argument is
given, and scale_filters' own omega shape. Value checks that would need a host sync on a
device (out-of-range branch ids) happen inside the kernels: at once on CPU, as an
asynchronous device assert on CUDA."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .ops._common import in_words_of, shown
from .ops.pgd.functional import mifgsm_step_, pgd_init, pgd_step_
from .ops.add_relu import add_relu as _add_relu

_ops = torch.ops.fastrobust

__all__ = ["multi_batch_norm", "mixed_batch_norm", "film", "channel_scale", "scale_filters",
           "add_relu", "pgd_step_", "mifgsm_step_", "pgd_init"]


# --- the one check this side makes, and the op's errors in the caller's words -----------------

def _real(op: str, name: str, v) -> float:
    """A plain real number (int, float, numpy scalar; not bool, str or a tensor) as float."""
    if type(v) is float:  # (the common case, without the ABC checks below)
        return v
    if isinstance(v, (bool, str, bytes)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {shown(v)}")
    return float(v)


def _python_types(op, route_name, route, num_branches, training, momentum, eps, activation):
    """The arguments whose Python type the op cannot see, in the schema's types: the schema's
    parser would take a bool or a tensor as a number, a float as an int, and word a string in
    its own terms. Refusing those is the one check made here; every value (eps > 0, momentum in
    [0, 1], shapes, dtypes, devices) is the op's (csrc/batch_norm/checks.h). Returns
    (num_branches, training, momentum, cumulative, eps, relu)."""
    if not isinstance(route, Tensor):  # (the op takes branch or mix: both are optional there)
        raise TypeError(f"{op}: {route_name} must be a Tensor, got {type(route).__name__}")
    if type(num_branches) is not int and (isinstance(num_branches, bool) or
                                          not isinstance(num_branches, numbers.Integral)):
        raise TypeError(f"{op}: num_branches must be an int, got {shown(num_branches)}")
    if type(training) is not bool and not isinstance(training, numbers.Integral):
        raise TypeError(f"{op}: training must be a bool, got {type(training).__name__}")
    if activation not in (None, "relu"):
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")
    eps = _real(op, "eps", eps)
    cumulative = momentum is None
    momentum = 0.0 if cumulative else _real(op, "momentum", momentum)
    return int(num_branches), bool(training), momentum, cumulative, eps, activation == "relu"


def _num_branches(op, num_branches, *params):
    """K: ``num_branches``, else the first dimension of the first [K, C] tensor given."""
    if num_branches is not None:
        return num_branches
    for t in params:
        if isinstance(t, Tensor) and t.dim() >= 1:
            return t.shape[0]
    raise ValueError(f"{op}: pass num_branches when weight, bias and running stats are all None")


def _dense_extras(x, extras):
    """The extras as the op takes them: a [C] one broadcast to [N, C], each dense. One of
    another shape, or not a tensor, is passed as it is, for the op to refuse."""
    if extras[0] is None and extras[1] is None and extras[2] is None:
        return extras
    out = []
    for t in extras:
        if isinstance(t, Tensor) and isinstance(x, Tensor) and x.dim() >= 2:
            N, C = x.shape[:2]
            t = (t.expand(N, C) if t.shape == (C,) else t).contiguous()
        out.append(t)
    return out


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
    op = "multi_batch_norm"
    K = _num_branches(op, num_branches, weight, bias, running_mean, running_var)
    if isinstance(branch, Tensor) and branch.dtype in _NARROW_INTS:
        branch = branch.long()  # (the op takes int64 ids)
    return _batch_norm(op, "branch", x, branch, weight, bias, running_mean, running_var,
                       num_batches_tracked, (input_scale, film_gamma, film_beta), K, training,
                       momentum, eps, activation)


_NARROW_INTS = (torch.int32, torch.int16, torch.int8, torch.uint8)


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
    op = "mixed_batch_norm"
    # K is mix's second dimension (a mix of another rank is refused by the op, whatever K)
    K = mix.shape[1] if isinstance(mix, Tensor) and mix.dim() == 2 else 1
    return _batch_norm(op, "mix", x, mix, weight, bias, running_mean, running_var,
                       num_batches_tracked, (input_scale, film_gamma, film_beta), K, training,
                       momentum, eps, activation)


def _batch_norm(op, route_name, x, route, weight, bias, running_mean, running_var,
                num_batches_tracked, extras, K, training, momentum, eps, activation):
    """The registered op, whose checks are the argument checks, on the public function's
    arguments; its errors in that function's words. A non-contiguous weight, bias or mix (all
    legal) is made contiguous (a differentiable copy of a [K, C] / [N, K] tensor). The CPU
    kernels update running statistics as contiguous tensors: a non-contiguous one is updated
    through a contiguous copy written back into the caller's tensor. The kernels of other
    devices (Triton on CUDA, the eager ones) read and write the running mean and variance
    through their strides, with no copy."""
    K, training, momentum, cumulative, eps, relu = _python_types(
        op, route_name, route, K, training, momentum, eps, activation)
    route = route.contiguous()
    weight, bias = (t.contiguous() if isinstance(t, Tensor) else t for t in (weight, bias))
    stats = (running_mean, running_var, num_batches_tracked)
    strided = isinstance(x, Tensor) and x.device.type != "cpu"
    work = [t.contiguous() if isinstance(t, Tensor) and not (strided and i < 2) else t
            for i, t in enumerate(stats)]
    branch, mix = (None, route) if route_name == "mix" else (route, None)
    try:
        y = _ops.multi_bn.default(x, branch, mix, weight, bias, *work,
                                  *_dense_extras(x, extras), K, training, momentum, cumulative,
                                  eps, relu)[0]
    except (RuntimeError, TypeError, ValueError) as e:
        raise in_words_of(op, e, x, K) from None
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


def _film(op, x, gamma, beta, x_name="x", gamma_name="gamma", required=()):
    """The film op for the public function ``op``, its errors naming that function and its
    argument names (``x_name``, ``gamma_name``; ``required``: those it does not take None
    for). gamma and beta are made dense, as the op's kernels read them."""
    gamma, beta = (t.contiguous() if isinstance(t, Tensor) else t for t in (gamma, beta))
    try:
        return _ops.film.default(x, gamma, beta)
    except (RuntimeError, TypeError, ValueError) as e:
        raise in_words_of(op, e, names={"x": x_name, "gamma": gamma_name},
                           required=required) from None


def channel_scale(x: Tensor, scale: Tensor) -> Tensor:
    """y = scale[n,c]·x with ``scale`` ``[N, C]`` or ``[C]`` (docs/math.md): AW-Net's filter-wise
    scaling of a bias-free conv, applied to its output, since conv(x, ω⊙W) = ω[c]·conv(x, W).
    Before a batch norm, prefer its fused ``input_scale`` (the scaled tensor is never
    written)."""
    if scale is None:  # (film takes None for gamma: channel_scale needs a scale)
        raise TypeError("channel_scale: scale must be a Tensor, got NoneType")
    return _film("channel_scale", x, scale, None, gamma_name="scale", required=("scale",))


def scale_filters(weight: Tensor, omega: Tensor) -> Tensor:
    """The weight-side form of filter-wise scaling for a shared ω (docs/math.md): filter m of
    ``weight`` ``[C_out, ...]`` times ``omega[m]`` (``[C_out]``). Differentiable in both."""
    op = "scale_filters"
    # As a [1, C_out, ...] activation, the filters are the channels; film also takes an
    # [N, C] = [1, C_out] gamma, so omega's own shape [C_out] is this function's to check.
    if isinstance(weight, Tensor) and isinstance(omega, Tensor):
        if weight.dim() < 1:
            raise ValueError(f"{op}: weight must be [C_out, ...], got a 0-dim tensor")
        if omega.shape != (weight.shape[0],):
            raise ValueError(f"{op}: omega must have shape [C_out] = [{weight.shape[0]}], "
                             f"got {list(omega.shape)}")
        weight = weight.unsqueeze(0)
    elif omega is None:
        raise TypeError(f"{op}: omega must be a Tensor, got NoneType")
    return _film(op, weight, omega, None, x_name="weight", gamma_name="omega",
                 required=("weight", "omega")).squeeze(0)


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
