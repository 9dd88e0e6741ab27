"""The Python side of the ops registered in C++ (csrc/ops.cpp): their fake (meta)
implementations, the differentiable backward used for second derivatives, the Python kernels
(fastrobust.backends) and the thin entry points the functional API calls.

    functional.multi_batch_norm ─┐
    functional.mixed_batch_norm ─┴─ torch.ops.fastrobust.multi_bn ─┐
    functional.film ─────────────── torch.ops.fastrobust.film ─────┼─ Autograd (C++ node)
    functional.pgd_step_, ... ───── torch.ops.fastrobust.pgd_step ─┤   then the device's
    distributed.sync_*_batch_norm ─ torch.ops.fastrobust.sync_multi_bn┘  kernel: CPU C++,
                                      (its node calls sync_bn_stats,   CUDA Triton, else eager
                                      all-reduce, sync_bn_apply)

Every call, eager or traced by torch.compile, takes the same path: the dispatcher's Autograd
kernel (one C++ node per call), then the device's kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .backends._schema import checked
from ._engine import bn_grads_with_graph
from ._spec import BNGrad, PgdMode, acc_dtype, needs  # noqa: F401 - re-exported

_ops = torch.ops.fastrobust


# --- fake (meta) implementations: shapes and dtypes only -------------------------------------

def _fake_multi_bn(x, branch, mix, weight, bias, running_mean, running_var,
                   num_batches_tracked, input_scale, film_gamma, film_beta, num_branches,
                   training, momentum, cumulative, eps, relu):
    acc = acc_dtype(x)
    stats = (num_branches, x.shape[1])
    batch_stats = training or running_mean is None
    planes = (2, x.shape[0], x.shape[1]) if mix is not None and batch_stats else (0,)
    return (torch.empty_like(x), x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc),
            x.new_empty(planes, dtype=acc))


def _fake_multi_bn_backward(dy, x, branch, mix, weight, bias, mean, invstd, planes,
                            input_scale, film_gamma, film_beta, num_branches, batch_stats, relu,
                            needs):
    acc = acc_dtype(x)
    N, C = x.shape[:2]
    shapes = {BNGrad.MIX: (N, num_branches), BNGrad.WEIGHT: (num_branches, C),
              BNGrad.BIAS: (num_branches, C), BNGrad.INPUT_SCALE: (N, C),
              BNGrad.FILM_GAMMA: (N, C), BNGrad.FILM_BETA: (N, C)}
    out = [torch.empty_like(x) if needs[BNGrad.X] else x.new_empty(0)]
    for g in list(BNGrad)[1:]:
        out.append(x.new_empty(shapes[g] if needs[g] else (0,), dtype=acc))
    return tuple(out)


def _fake_film(x, gamma, beta):
    return torch.empty_like(x)


def _fake_film_backward(dy, x, gamma, needs, per_channel):
    acc = acc_dtype(x)
    N, C = x.shape[:2]
    shape = [(C,) if pc else (N, C) for pc in per_channel]
    return (torch.empty_like(x) if needs[0] else x.new_empty(0),
            x.new_empty(shape[0] if needs[1] else (0,), dtype=acc),
            x.new_empty(shape[1] if needs[2] else (0,), dtype=acc))


def _fake_sync_bn_stats(x, branch, mix, input_scale, num_batches_tracked, num_branches,
                        cumulative, rank, world_size):
    acc = acc_dtype(x)
    K, (N, C) = num_branches, x.shape[:2]
    return (x.new_empty((world_size, K + 3 * K * C), dtype=torch.float64),
            x.new_empty((2, N, C) if mix is not None else (0,), dtype=acc),
            x.new_empty(K if cumulative and num_batches_tracked is not None else 0, dtype=acc))


def _fake_sync_bn_apply(x, branch, mix, weight, bias, running_mean, running_var,
                        num_batches_tracked, input_scale, film_gamma, film_beta, payload, old,
                        num_branches, momentum, cumulative, eps, relu):
    acc = acc_dtype(x)
    stats = (num_branches, x.shape[1])
    return torch.empty_like(x), x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc)


def _sync_parts_shape(x, need_s) -> tuple:
    """The shape of sync_bn_grad_sums' `parts`: the Triton kernels' per-plane partial sums
    where they serve the call, else empty."""
    if x.numel() == 0 or backends.choose("multi_bn", x.device) != "triton":
        return (0,)
    import triton
    from .kernels._common import _blocks, _ncs, _splits
    x3 = _ncs(x)
    N, C, S = x3.shape
    block_c, block_s = _blocks(x3, True)
    T, _ = _splits(N, triton.cdiv(C, block_c), S, block_s)
    return (4 if need_s else 2, T, N, C)


def _fake_sync_bn_grad_sums(dy, x, branch, mix, weight, bias, mean, invstd, input_scale,
                            film_gamma, film_beta, num_branches, relu, needs):
    acc = mean.dtype
    stats = (num_branches, x.shape[1])
    need_s = bool(needs[BNGrad.INPUT_SCALE]) and input_scale is not None
    return (x.new_empty((2, *stats), dtype=acc),
            x.new_empty(_sync_parts_shape(x, need_s), dtype=acc),
            x.new_empty(stats if needs[BNGrad.WEIGHT] else (0,), dtype=acc),
            x.new_empty(stats if needs[BNGrad.BIAS] else (0,), dtype=acc))


def _fake_sync_bn_dx(dy, x, branch, mix, weight, bias, mean, invstd, planes, input_scale,
                     film_gamma, film_beta, sums, parts, payload, num_branches, relu, needs):
    acc = mean.dtype
    N, C = x.shape[:2]
    out = [torch.empty_like(x) if needs[BNGrad.X] else x.new_empty(0)]
    for g, t, shape in ((BNGrad.MIX, mix, (N, num_branches)),
                        (BNGrad.INPUT_SCALE, input_scale, (N, C)),
                        (BNGrad.FILM_GAMMA, film_gamma, (N, C)),
                        (BNGrad.FILM_BETA, film_beta, (N, C))):
        out.append(x.new_empty(shape if needs[g] and t is not None else (0,), dtype=acc))
    return tuple(out)


def _fake_sync_multi_bn(x, *args):
    return torch.empty_like(x)


def _no_result(*args):
    return None


# (with the kernels' argument checks: a bad call fails as it would in eager, where every
# kernel checks; an argument on the meta device among real ones raises instead of tracing)
for _name, _fn in checked({"multi_bn": _fake_multi_bn,
                           "multi_bn_backward": _fake_multi_bn_backward, "film": _fake_film,
                           "film_backward": _fake_film_backward, "pgd_step": _no_result,
                           "pgd_init": _no_result, "mifgsm_step": _no_result,
                           "sync_bn_stats": _fake_sync_bn_stats,
                           "sync_bn_apply": _fake_sync_bn_apply,
                           "sync_bn_grad_sums": _fake_sync_bn_grad_sums,
                           "sync_bn_dx": _fake_sync_bn_dx,
                           "sync_multi_bn": _fake_sync_multi_bn}).items():
    torch.library.register_fake(f"fastrobust::{_name}", _fn)


# --- the backward under create_graph=True: differentiable torch ops ----------------------------

def _multi_bn_grads_with_graph(dy, x, branch, mix, weight, bias, mean, invstd, input_scale,
                               film_gamma, film_beta, num_branches, batch_stats, eps, relu,
                               needs):
    grads = bn_grads_with_graph(dy, x, mix if mix is not None else branch, weight, bias, mean,
                                invstd, input_scale, film_gamma, film_beta, num_branches,
                                batch_stats, eps, relu, mix is not None, tuple(needs))
    return [x.new_empty(0) if g is None else g for g in grads]


torch.library.impl("fastrobust::multi_bn_grads_with_graph", "CompositeImplicitAutograd")(
    _multi_bn_grads_with_graph)

backends._register_defaults()  # the Python kernels: eager (any device), Triton (CUDA)


# --- entry points of the functional API --------------------------------------------------------

_multi_bn = _ops.multi_bn.default
_film = _ops.film.default
_add_relu = _ops.add_relu.default


def batch_norm(x, branch, mix, weight, bias, running_mean, running_var, num_batches_tracked,
               input_scale, film_gamma, film_beta, K, training, momentum, cumulative, eps,
               relu) -> Tensor:
    """y of the routed (branch given) or mixed (mix given) op; in training the running stats
    are updated in place."""
    return _multi_bn(x, branch, mix, weight, bias, running_mean, running_var,
                     num_batches_tracked, input_scale, film_gamma, film_beta, K, training,
                     momentum, cumulative, eps, relu)[0]


def film(x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
    return _film(x, gamma, beta)


def add_relu(a: Tensor, b: Tensor) -> Tensor:
    """relu(a + b): the fused op for equal shapes, dtypes and devices outside torch.compile
    (which fuses the pair itself); the two plain ops otherwise."""
    if (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and not torch.compiler.is_compiling()):
        return _add_relu(a, b)
    return torch.relu(a + b)


def pgd_step(x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, l2, clip_min, clip_max) -> None:
    _ops.pgd_step.default(x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, l2, clip_min,
                          clip_max)


def pgd_init(noise, x_nat, eps_t, eps, radius, l2, clip_min, clip_max) -> None:
    _ops.pgd_init.default(noise, x_nat, eps_t, eps, radius, l2, clip_min, clip_max)


def mifgsm_step(x_adv, grad, momentum, x_nat, eps_t, eps, alpha_t, alpha, decay, clip_min,
                clip_max) -> None:
    _ops.mifgsm_step.default(x_adv, grad, momentum, x_nat, eps_t, eps, alpha_t, alpha, decay,
                             clip_min, clip_max)
