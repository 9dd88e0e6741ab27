"""The registered custom ops: schema, implementation dispatch, fake (meta) impl and autograd.

Every op is `torch.ops.fastrobust.<name>`. Its implementation asks `fastrobust.backends` which
kernel serves the call (C++, Triton, CUDA C++ or the eager engine) and calls that backend's
function. The fake impls let `torch.compile(fullgraph=True)` trace models that use the ops;
autograd calls the matching backward op, which is itself a registered op.

    functional.multi_batch_norm ── multi_bn_fwd ──(autograd)── multi_bn_bwd ─┐
    functional.mixed_batch_norm ── mixed_bn_fwd ──(autograd)── mixed_bn_bwd ─┴─ bn_forward /
                                                                               bn_backward
    functional.film, channel_scale, scale_filters ── film_fwd ──(autograd)── film_bwd
                                                                 └─ film_forward / film_backward

The forward ops are functional (autograd cannot be registered on a mutating op): in training
they return the updated running stats, which the functional API copies into the buffers, and
empty tensors when there is nothing to update.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import backends
from ._engine import bn_grads_with_graph
from .reference import acc_dtype

# Bits of the `needs` argument of the backward ops: which gradients to compute.
NEED_X, NEED_MIX, NEED_WEIGHT, NEED_BIAS, NEED_SCALE, NEED_GAMMA, NEED_BETA = (
    1 << i for i in range(7))


def _unpack(needs: int) -> tuple[bool, ...]:
    return tuple(bool(needs & bit) for bit in
                 (NEED_X, NEED_MIX, NEED_WEIGHT, NEED_BIAS, NEED_SCALE, NEED_GAMMA, NEED_BETA))


def _fake_forward(x, K, running_mean, num_batches_tracked, training, mixed):
    stats = (K, x.shape[1])
    acc = acc_dtype(x)
    if training and running_mean is not None:
        new_running = (torch.empty_like(running_mean), torch.empty_like(running_mean),
                       x.new_empty(0 if num_batches_tracked is None else K, dtype=torch.long))
    else:
        new_running = (x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=torch.long))
    out = (torch.empty_like(x), x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc),
           *new_running)
    if mixed:
        batch_stats = training or running_mean is None
        out += (x.new_empty((2, x.shape[0], x.shape[1]) if batch_stats else (0,), dtype=acc),)
    return out


def _fake_backward(x, K, needs, mixed):
    nx, nmix, nw, nb, ns, ng, nbe = _unpack(needs)
    acc = acc_dtype(x)
    N, C = x.shape[:2]

    def e(flag, shape):
        return x.new_empty(shape if flag else (0,), dtype=acc)

    out = (torch.empty_like(x) if nx else x.new_empty(0),)
    if mixed:
        out += (e(nmix, (N, K)),)
    return out + (e(nw, (K, C)), e(nb, (K, C)), e(ns, (N, C)), e(ng, (N, C)), e(nbe, (N, C)))


def _impl(op, x, *tensors):
    return backends.select(op, x.device, (x,) + tensors)


# --- multi_bn: sample-routed BN -----------------------------------------------------------

@torch.library.custom_op("fastrobust::multi_bn_fwd", mutates_args=())
def multi_bn_fwd(x: Tensor, branch: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 num_batches_tracked: Optional[Tensor], input_scale: Optional[Tensor],
                 film_gamma: Optional[Tensor], film_beta: Optional[Tensor], num_branches: int,
                 training: bool, momentum: float, cumulative: bool, eps: float, relu: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, mean, invstd, new_running_mean, new_running_var, new_num_batches_tracked);
    mean/invstd [K, C] are the statistics y was normalized with."""
    impl = _impl("multi_bn", x, weight, bias, running_mean, running_var, input_scale,
                 film_gamma, film_beta)
    return impl.bn_forward(x, branch, None, weight, bias, running_mean, running_var,
                           num_batches_tracked, input_scale, film_gamma, film_beta,
                           num_branches, training, momentum, cumulative, eps, relu)[:6]


@multi_bn_fwd.register_fake
def _(x, branch, weight, bias, running_mean, running_var, num_batches_tracked, input_scale,
      film_gamma, film_beta, num_branches, training, momentum, cumulative, eps, relu):
    return _fake_forward(x, num_branches, running_mean, num_batches_tracked, training, False)


@torch.library.custom_op("fastrobust::multi_bn_bwd", mutates_args=())
def multi_bn_bwd(dy: Tensor, x: Tensor, branch: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
                 input_scale: Optional[Tensor], film_gamma: Optional[Tensor],
                 film_beta: Optional[Tensor], num_branches: int, batch_stats: bool, relu: bool,
                 needs: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias, dinput_scale, dfilm_gamma, dfilm_beta); the ones not
    asked for in `needs` are empty. Parameter gradients are in the statistics' dtype."""
    impl = _impl("multi_bn", x, weight, bias, mean, invstd, input_scale, film_gamma, film_beta)
    dx, _, *rest = impl.bn_backward(dy, x, branch, None, weight, bias, mean, invstd,
                                    x.new_empty(0), input_scale, film_gamma, film_beta,
                                    num_branches, batch_stats, relu,
                                    _unpack(needs & ~NEED_MIX))
    return (dx, *rest)


@multi_bn_bwd.register_fake
def _(dy, x, branch, weight, bias, mean, invstd, input_scale, film_gamma, film_beta,
      num_branches, batch_stats, relu, needs):
    return _fake_backward(x, num_branches, needs, False)


# --- mixed_bn: soft-mixed BN ----------------------------------------------------------------

@torch.library.custom_op("fastrobust::mixed_bn_fwd", mutates_args=())
def mixed_bn_fwd(x: Tensor, mix: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 num_batches_tracked: Optional[Tensor], input_scale: Optional[Tensor],
                 film_gamma: Optional[Tensor], film_beta: Optional[Tensor], training: bool,
                 momentum: float, cumulative: bool, eps: float, relu: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As multi_bn_fwd, plus x's per-plane mean and M2 ([2, N, C], for the mix gradient
    through the mix-weighted statistics; empty with running statistics)."""
    impl = _impl("mixed_bn", x, mix, weight, bias, running_mean, running_var, input_scale,
                 film_gamma, film_beta)
    return impl.bn_forward(x, None, mix, weight, bias, running_mean, running_var,
                           num_batches_tracked, input_scale, film_gamma, film_beta,
                           mix.shape[1], training, momentum, cumulative, eps, relu)


@mixed_bn_fwd.register_fake
def _(x, mix, weight, bias, running_mean, running_var, num_batches_tracked, input_scale,
      film_gamma, film_beta, training, momentum, cumulative, eps, relu):
    return _fake_forward(x, mix.shape[1], running_mean, num_batches_tracked, training, True)


@torch.library.custom_op("fastrobust::mixed_bn_bwd", mutates_args=())
def mixed_bn_bwd(dy: Tensor, x: Tensor, mix: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], mean: Tensor, invstd: Tensor, planes: Tensor,
                 input_scale: Optional[Tensor], film_gamma: Optional[Tensor],
                 film_beta: Optional[Tensor], batch_stats: bool, relu: bool, needs: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dmix, dweight, dbias, dinput_scale, dfilm_gamma, dfilm_beta)."""
    impl = _impl("mixed_bn", x, mix, weight, bias, mean, invstd, input_scale, film_gamma,
                 film_beta)
    return tuple(impl.bn_backward(dy, x, None, mix, weight, bias, mean, invstd, planes,
                                  input_scale, film_gamma, film_beta, mix.shape[1],
                                  batch_stats, relu, _unpack(needs)))


@mixed_bn_bwd.register_fake
def _(dy, x, mix, weight, bias, mean, invstd, planes, input_scale, film_gamma, film_beta,
      batch_stats, relu, needs):
    return _fake_backward(x, mix.shape[1], needs, True)


# --- autograd of the two BN ops -------------------------------------------------------------

def _needs(flags) -> int:
    bits = (NEED_X, NEED_MIX, NEED_WEIGHT, NEED_BIAS, NEED_SCALE, NEED_GAMMA, NEED_BETA)
    return sum(bit for bit, f in zip(bits, flags) if f)


def _bn_setup(ctx, inputs, output, mixed):
    (x, route, weight, bias, running_mean, _, _, input_scale, film_gamma, film_beta) = inputs[:10]
    training = inputs[10] if mixed else inputs[11]
    relu = inputs[-1]
    _, mean, invstd, *rest = output
    ctx.mark_non_differentiable(mean, invstd, *rest)
    planes = rest[3] if mixed else None
    ctx.save_for_backward(x, route, weight, bias, mean, invstd, planes, input_scale,
                          film_gamma, film_beta)
    ctx.num_branches = None if mixed else inputs[10]
    ctx.batch_stats = training or running_mean is None
    ctx.relu = relu
    ctx.eps = inputs[-2]
    ctx.dtypes = [None if t is None else t.dtype
                  for t in (x, route, weight, bias, input_scale, film_gamma, film_beta)]


def _bn_backward(ctx, dy, *_grads_of_statistics, mixed):
    x, route, weight, bias, mean, invstd, planes, scale, gamma, beta = ctx.saved_tensors
    ng = ctx.needs_input_grad
    # Inputs: x, route, weight, bias, rm, rv, nbt, scale, gamma, beta, ...
    flags = (ng[0], mixed and ng[1], ng[2], ng[3], ng[7], ng[8], ng[9])
    needs = _needs(flags)
    if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
        dx, dmix, dw, db, ds, dg, dbe = bn_grads_with_graph(
            dy, x, route, weight, bias, mean, invstd, scale, gamma, beta,
            route.shape[1] if mixed else ctx.num_branches, ctx.batch_stats, ctx.eps, ctx.relu,
            mixed, flags)
    elif mixed:
        dx, dmix, dw, db, ds, dg, dbe = torch.ops.fastrobust.mixed_bn_bwd(
            dy, x, route, weight, bias, mean, invstd, planes, scale, gamma, beta,
            ctx.batch_stats, ctx.relu, needs)
    else:
        dx, dw, db, ds, dg, dbe = torch.ops.fastrobust.multi_bn_bwd(
            dy, x, route, weight, bias, mean, invstd, scale, gamma, beta, ctx.num_branches,
            ctx.batch_stats, ctx.relu, needs)
        dmix = None
    grads = [dx, dmix, dw, db, ds, dg, dbe]
    out = [g.to(dt) if f and g is not None else None
           for g, f, dt in zip(grads, flags, ctx.dtypes)]
    dx, dmix, dw, db, ds, dg, dbe = out
    tail = [None] * (5 if mixed else 6)  # the non-tensor arguments
    return (dx, dmix, dw, db, None, None, None, ds, dg, dbe, *tail)


multi_bn_fwd.register_autograd(
    lambda ctx, *g: _bn_backward(ctx, *g, mixed=False),
    setup_context=lambda ctx, inputs, output: _bn_setup(ctx, inputs, output, False))
mixed_bn_fwd.register_autograd(
    lambda ctx, *g: _bn_backward(ctx, *g, mixed=True),
    setup_context=lambda ctx, inputs, output: _bn_setup(ctx, inputs, output, True))


# --- the eager fast path of the two BN ops ---------------------------------------------------
# The registered ops above are what torch.compile traces and opcheck checks. Called eagerly, a
# custom op's Python layers cost ~40 µs a call, twice per backward (measured): at CIFAR block
# sizes on a CPU that is more than the kernel itself. Outside compilation, on plain tensors and
# with no dispatch mode active, the functional API instead runs the same backend functions
# through one autograd.Function. FASTROBUST_CUSTOM_OP_PATH=1 turns the fast path off.

def fast_path_ok(*tensors) -> bool:
    if os.environ.get("FASTROBUST_CUSTOM_OP_PATH") == "1" or torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    return all(t is None or type(t) in (Tensor, torch.nn.Parameter) for t in tensors)


class _BNFunction(torch.autograd.Function):
    """multi_bn_fwd / mixed_bn_fwd and their backward, without the custom-op layers (for a
    backend whose kernels have no C++ autograd node: Triton, eager)."""

    @staticmethod
    def forward(ctx, impl, x, route, weight, bias, running_mean, running_var,
                num_batches_tracked, input_scale, film_gamma, film_beta, K, training, momentum,
                cumulative, eps, relu, mixed):
        out = impl.bn_forward(x, None if mixed else route, route if mixed else None, weight,
                              bias, running_mean, running_var, num_batches_tracked,
                              input_scale, film_gamma, film_beta, K, training, momentum,
                              cumulative, eps, relu)
        y, mean, invstd, *rest = out
        planes = rest[3] if mixed else None
        ctx.mark_non_differentiable(mean, invstd, *rest[:3])
        ctx.save_for_backward(x, route, weight, bias, mean, invstd, planes, input_scale,
                              film_gamma, film_beta)
        ctx.impl, ctx.K, ctx.mixed, ctx.relu, ctx.eps = impl, K, mixed, relu, eps
        ctx.batch_stats = training or running_mean is None
        ctx.dtypes = [None if t is None else t.dtype
                      for t in (x, route, weight, bias, input_scale, film_gamma, film_beta)]
        return y, mean, invstd, *rest[:3]

    @staticmethod
    def backward(ctx, dy, *_):
        x, route, weight, bias, mean, invstd, planes, scale, gamma, beta = ctx.saved_tensors
        ng = ctx.needs_input_grad[1:]  # [0] is the backend
        flags = (ng[0], ctx.mixed and ng[1], ng[2], ng[3], ng[7], ng[8], ng[9])
        if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
            grads = bn_grads_with_graph(dy, x, route, weight, bias, mean, invstd, scale, gamma,
                                        beta, ctx.K, ctx.batch_stats, ctx.eps, ctx.relu,
                                        ctx.mixed, flags)
        else:
            grads = ctx.impl.bn_backward(  # every backend takes dy in any layout
                dy, x, None if ctx.mixed else route, route if ctx.mixed else None, weight, bias,
                mean, invstd, planes if ctx.mixed else x.new_empty(0), scale, gamma, beta,
                ctx.K, ctx.batch_stats, ctx.relu, flags)
        out = [g.to(dt) if f and g is not None else None
               for g, f, dt in zip(grads, flags, ctx.dtypes)]
        dx, dmix, dw, db, ds, dg, dbe = out
        return (None, dx, dmix, dw, db, None, None, None, ds, dg, dbe) + (None,) * 7


def _store_running(training, running_mean, running_var, num_batches_tracked, new):
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new[0])
            running_var.copy_(new[1])
            if num_batches_tracked is not None:
                num_batches_tracked.copy_(new[2])


def batch_norm(x, route, weight, bias, running_mean, running_var, num_batches_tracked,
               input_scale, film_gamma, film_beta, K, training, momentum, cumulative, eps,
               relu, mixed) -> Tensor:
    """y of the routed (mixed=False, route = branch) or mixed (route = mix) op; in training
    the running stats are updated in place. Eager calls served by the C++ kernels take their
    C++ autograd node (`fastrobust._C.bn_autograd`), other eager calls a Python
    autograd.Function over the backend's kernels; traced calls (torch.compile) and calls with
    tensor subclasses or modes the registered ops."""
    tensors = (x, route, weight, bias, running_mean, running_var, num_batches_tracked,
               input_scale, film_gamma, film_beta)
    scalars = (K, training, momentum, cumulative, eps, relu, mixed)
    if fast_path_ok(*tensors):
        impl = _impl("mixed_bn" if mixed else "multi_bn", x, *((route,) if mixed else ()),
                     weight, bias, running_mean, running_var, input_scale, film_gamma, film_beta)
        node = getattr(impl, "bn_autograd", None)
        if node is not None:
            return node(*tensors, *scalars)  # updates the running stats itself
        y, _, _, *new = _BNFunction.apply(impl, *tensors, *scalars)
    elif mixed:
        y, _, _, *new = torch.ops.fastrobust.mixed_bn_fwd(*tensors, *scalars[1:6])[:6]
    else:
        y, _, _, *new = torch.ops.fastrobust.multi_bn_fwd(*tensors, *scalars[:6])
    _store_running(training, running_mean, running_var, num_batches_tracked, new)
    return y


def add_relu(a: Tensor, b: Tensor) -> Tensor:
    """relu(a + b): a ResNet block's residual junction. Eager CPU calls with equal shapes and
    dtypes take one fused pass each way (`fastrobust._C.add_relu`); everything else (CUDA,
    torch.compile, which fuses it itself, a forced eager backend) the two plain ops."""
    if (a.device.type == "cpu" and a.shape == b.shape and a.dtype == b.dtype
            and b.device.type == "cpu" and backends.forced() in (None, "cpu")
            and fast_path_ok(a, b)):
        ext, _ = backends.extension()
        if ext is not None and hasattr(ext, "add_relu"):
            return ext.add_relu(a, b)
    return torch.relu(a + b)


# --- film: per-sample affine; also channel_scale and scale_filters --------------------------

@torch.library.custom_op("fastrobust::film_fwd", mutates_args=())
def film_fwd(x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor]) -> Tensor:
    """y = γ[n,c]·x + β[n,c] with [N, C] γ, β (either may be None)."""
    return _impl("film", x, gamma, beta).film_forward(x, gamma, beta)


@film_fwd.register_fake
def _(x, gamma, beta):
    return torch.empty_like(x)


@torch.library.custom_op("fastrobust::film_bwd", mutates_args=())
def film_bwd(dy: Tensor, x: Tensor, gamma: Optional[Tensor], needs: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dgamma, dbeta), [N, C] in the accumulation dtype; unneeded ones empty."""
    nx, _, _, _, _, ng, nb = _unpack(needs)
    return tuple(_impl("film", x, gamma).film_backward(dy, x, gamma, nx, ng, nb))


@film_bwd.register_fake
def _(dy, x, gamma, needs):
    nx, _, _, _, _, ng, nb = _unpack(needs)
    acc = acc_dtype(x)
    N, C = x.shape[:2]
    return (torch.empty_like(x) if nx else x.new_empty(0),
            x.new_empty((N, C) if ng else (0,), dtype=acc),
            x.new_empty((N, C) if nb else (0,), dtype=acc))


def _film_setup(ctx, inputs, output):
    x, gamma, beta = inputs
    ctx.save_for_backward(x if gamma is not None else None, gamma)
    ctx.dtypes = [None if t is None else t.dtype for t in (gamma, beta)]
    ctx.x_meta = (x.shape, x.dtype)


def _film_backward(ctx, dy):
    x, gamma = ctx.saved_tensors
    nx, ng, nb = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph: the same sums in differentiable torch ops
        return film_grads_with_graph(dy, x, gamma, ctx.x_meta, (nx, ng, nb), ctx.dtypes)
    if x is None:  # no γ: dx = dy and dβ = Σ_s dy need no x; a zero-copy stand-in
        x = dy
    needs = _needs((nx, False, False, False, False, ng, nb))
    dx, dg, db = torch.ops.fastrobust.film_bwd(dy, x, gamma, needs)
    g_dt, b_dt = ctx.dtypes
    return (dx if nx else None, dg.to(g_dt) if ng else None, db.to(b_dt) if nb else None)


def film_grads_with_graph(dy, x, gamma, x_meta, needs, dtypes):
    """(dx, dγ, dβ) of y = γ·x + β as differentiable torch ops (double backward); x is None
    when there is no γ."""
    nx, ng, nb = needs
    nd = len(x_meta[0])
    dims = tuple(range(2, nd))
    acc = acc_dtype(dy)

    def per_plane(t):
        return t.to(acc).sum(dims) if dims else t.to(acc)

    dx = (dy * gamma.reshape(*gamma.shape, *([1] * (nd - 2))).to(dy.dtype) if gamma is not None
          else dy).to(x_meta[1]) if nx else None
    dg = per_plane(dy * x).to(dtypes[0]) if ng else None
    db = per_plane(dy).to(dtypes[1]) if nb else None
    return dx, dg, db


film_fwd.register_autograd(_film_backward, setup_context=_film_setup)


# --- pgd: fused projected-gradient steps, in place ------------------------------------------
# Modes of the kernels' pgd_update (csrc/cpu/pgd.h): linf with sign(grad), l2, and linf with
# the direction as is (the random start).
PGD_LINF, PGD_L2, PGD_LINF_RAW = 0, 1, 2


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


def _pgd_impl(x_adv, *tensors):
    return backends.select("pgd", x_adv.device, (x_adv,) + tensors)


# Registered with torch.library.define rather than custom_op: these mutating ops need no
# autograd, and the plain dispatcher path costs ~4 µs a call against ~40 µs (measured), which
# is most of a CIFAR-sized step.
_lib = torch.library.Library("fastrobust", "FRAGMENT")
_lib.define("pgd_step(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, Tensor? eps_t, float eps, "
            "Tensor? alpha_t, float alpha, bool l2, float clip_min, float clip_max) -> ()")
_lib.define("pgd_init(Tensor(a!) noise, Tensor x_nat, Tensor? eps_t, float eps, "
            "Tensor? radius, bool l2, float clip_min, float clip_max) -> ()")
_lib.define("mifgsm_step(Tensor(a!) x_adv, Tensor grad, Tensor(b!) momentum, Tensor x_nat, "
            "Tensor? eps_t, float eps, Tensor? alpha_t, float alpha, float decay, "
            "float clip_min, float clip_max) -> ()")


def _pgd_step(x_adv, grad, x_nat, eps_t, eps, alpha_t, alpha, l2, clip_min, clip_max):
    """x_adv ← clamp(x_nat + P_ε(x_adv + α·dir(grad) − x_nat), clip_min, clip_max), dir = sign
    (linf) or grad/‖grad_n‖ (l2). eps_t/alpha_t: per-sample [N] in the accumulation dtype,
    or None to use the floats. Odd layouts are copied into x_adv's (or a contiguous) one."""
    work = x_adv if flat_layout(x_adv) else x_adv.contiguous()
    _pgd_impl(work, grad, x_nat).pgd_update(
        work, work, _like(grad, work), _like(x_nat, work), eps_t, eps, alpha_t, alpha,
        PGD_L2 if l2 else PGD_LINF, clip_min, clip_max)
    if work is not x_adv:
        x_adv.copy_(work)


def _pgd_init(noise, x_nat, eps_t, eps, radius, l2, clip_min, clip_max):
    """Turns noise (linf: U(−1, 1); l2: N(0, 1)) into the random start, in place: linf
    clamp(x_nat + P_ε(ε·noise)); l2 clamp(x_nat + P_ε(radius_n·noise/‖noise_n‖)); radius is
    per sample [N]."""
    work = noise if flat_layout(noise) else noise.contiguous()
    xn = _like(x_nat, work)
    if l2:
        args = (eps_t, eps, radius, 0.0, PGD_L2)
    else:
        args = (eps_t, eps, eps_t, eps, PGD_LINF_RAW)
    _pgd_impl(work, x_nat).pgd_update(work, xn, work, xn, *args, clip_min, clip_max)
    if work is not noise:
        noise.copy_(work)


def _mifgsm_step(x_adv, grad, momentum, x_nat, eps_t, eps, alpha_t, alpha, decay, clip_min,
                 clip_max):
    """momentum ← grad/mean(|grad_n|) + decay·momentum; then the linf step with
    sign(momentum). Both in place."""
    work = x_adv if flat_layout(x_adv) else x_adv.contiguous()
    buf = _like(momentum, work)
    _pgd_impl(work, grad, momentum, x_nat).mifgsm_update(
        work, _like(grad, work), buf, _like(x_nat, work), eps_t, eps, alpha_t, alpha, decay,
        clip_min, clip_max)
    if work is not x_adv:
        x_adv.copy_(work)
    if buf is not momentum:
        momentum.copy_(buf)


# The C++ autograd node's backward calls this op when a second derivative is asked for
# (grad mode on during the backward): its Python body is differentiable torch ops
# (CompositeImplicitAutograd), so the gradients it returns carry their own graph.
_lib.define("bn_grads_with_graph(Tensor dy, Tensor x, Tensor route, Tensor? weight, "
            "Tensor? bias, Tensor mean, Tensor invstd, Tensor? input_scale, Tensor? film_gamma, "
            "Tensor? film_beta, int num_branches, bool batch_stats, float eps, bool relu, "
            "bool mixed, int needs) -> Tensor[]")


def _bn_grads_op(dy, x, route, weight, bias, mean, invstd, input_scale, film_gamma, film_beta,
                 num_branches, batch_stats, eps, relu, mixed, needs):
    grads = bn_grads_with_graph(dy, x, route, weight, bias, mean, invstd, input_scale,
                                film_gamma, film_beta, num_branches, batch_stats, eps, relu,
                                mixed, _unpack(needs))
    return [x.new_empty(0) if g is None else g for g in grads]


_lib.impl("bn_grads_with_graph", _bn_grads_op, "CompositeImplicitAutograd")


def _no_result(*args):
    return None


for _name, _fn in (("pgd_step", _pgd_step), ("pgd_init", _pgd_init),
                   ("mifgsm_step", _mifgsm_step)):
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastrobust::{_name}", _no_result, lib=_lib)
