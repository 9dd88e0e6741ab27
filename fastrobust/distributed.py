"""Synchronized multi-branch batch norm for data-parallel training (torch.distributed, DDP).

In training, `sync_multi_batch_norm` / `sync_mixed_batch_norm` normalize every rank's samples
with the statistics of the *global* batch, per (branch, channel), as `nn.SyncBatchNorm` does
for one branch:

    forward   per rank: per-(k, c) weighted count and sums Σ(u − centre), Σ(u − centre)²
              (u = input_scale·x; fp64) from x's per-plane sums, merged exactly → ONE
              all-reduce of a [world, K + 3·K·C] payload in which each rank filled its own row
              (an all-gather) → the ranks' sums merged exactly (Chan's update, cross terms
              included: sums Σu, Σu² would lose the variance to E[u²] − E[u]² when
              |mean| ≫ std) → the fused op normalizes with them (BN·FiLM·ReLU in one pass,
              any backend), running stats updated from the global statistics
    backward  per rank: the fused op's backward with the statistics held fixed gives the
              direct gradients and the per-(k, c) sums T1 = Σ M·dz and T2 = Σ M·dz·x̂ →
              ONE all-reduce of [2·K·C] values → the statistics' share of ∂L/∂x (and of
              ∂L/∂input_scale, ∂L/∂mix) added per plane: ∂L/∂u += Q·u + R

A branch present on some ranks only, or on none, is handled by the sums (its count is the
global one; a branch with no values keeps its running stats, as in the single-process op).
dweight and dbias are each rank's own (DDP averages parameter gradients); dx is the gradient
of the sum of every rank's loss, as nn.SyncBatchNorm's, so DDP's average gives the gradient of
the global batch's mean loss.

Where the Triton kernels serve the BN op (CUDA; a forced 'triton' backend) the synchronized op
runs through them too (fastrobust/kernels/sync_bn.py `sync_bn_forward`, multi_bn.py `bn_backward` with
`all_reduce`): forward moments → local payload → the all-reduce → one kernel that normalizes
with the global statistics (3 launches), backward grad sums → local T1, T2 → the all-reduce →
one kernel that works out the per-plane results from the global sums and writes dx (3
launches); nothing on the host reads a value. Elsewhere (the CPU's
C++ kernels, the eager backend) the per-plane moments and the correction of dx are plain
PyTorch around the BN op.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import _ops  # noqa: F401 - registers the ops
from ._engine import Engine, TorchLeaves, plane_mean_m2, routing_weights
from ._common import acc_dtype, check_branch_values, check_mix_values, updated_running_stats

__all__ = ["sync_multi_batch_norm", "sync_mixed_batch_norm", "sync_active"]


def sync_active(process_group=None) -> bool:
    """True when statistics would be synchronized: torch.distributed is initialized and the
    group has more than one rank."""
    return (dist.is_available() and dist.is_initialized()
            and dist.get_world_size(process_group) > 1)


def _rank_and_world(group) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size: the row it fills in the
    forward's payload, and the rows. (0, 1) without an initialized process group (the op
    called in one process, as benchmarks/launch_counts.py does)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _bc(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(*t.shape, *([1] * (ndim - 2)))


def merge_ranks(pay: Tensor, K: int, C: int) -> tuple[Tensor, Tensor, Tensor]:
    """The global per-(k, c) count [K], mean and biased variance [K, C] from the all-reduced
    fp64 payload [world, K + 3·K·C], one row per rank: [count K | centre K·C | R K·C | Q K·C]
    with R, Q the rank's Σ(u − centre), Σ(u − centre)². An exact merge (Chan's, cross terms
    included): the ranks' sums are moved to one centre C0, the centre of the first rank with
    values of branch k, d = C_r − C0, R = Σ R_r + n_r·d, Q = Σ Q_r + 2·d·R_r + n_r·d²,
    mean = C0 + R/n, M2 = Q − R²/n. The plain-PyTorch twin of kernels/sync_bn.py
    `_global_stats`."""
    KC = K * C
    cnt = pay[:, :K, None]                                              # [R, K, 1]
    ctr, Rr, Qr = (pay[:, K + j * KC:K + (j + 1) * KC].view(-1, K, C) for j in range(3))
    n = cnt.sum(0)                                                      # [K, 1]
    nz = torch.where(n != 0, n, 1.0)
    first = (cnt[:, :, 0] != 0).to(torch.int8).argmax(0)                # [K], its first rank
    c0 = ctr.gather(0, first.view(1, K, 1).expand(1, K, C))[0]          # [K, C]
    d = torch.where(cnt != 0, ctr - c0, 0.0)
    R = (Rr + cnt * d).sum(0)
    Q = (Qr + (2 * Rr + cnt * d) * d).sum(0)
    return n[:, 0], c0 + R / nz, ((Q - R * R / nz) / nz).clamp_min(0)


def _where(M: Tensor, t: Tensor) -> Tensor:
    """M[n, k, None]·t with exact zeros where M is zero (a NaN sample stays out of branches it
    has no weight in)."""
    Mb = M[:, :, None]
    return torch.where(Mb != 0, Mb * t, 0.0)


def _kernel_path(x: Tensor) -> bool:
    """Whether the Triton kernels serve this call (where they serve the BN op: CUDA, or a
    forced 'triton'); an empty local batch takes the eager path, whose collectives are the
    same (one fp64 [world, K + 3·K·C] all-reduce forward, one [2·K·C] backward)."""
    from . import backends
    return x.numel() > 0 and backends.choose("multi_bn", x.device) == "triton"


class _SyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, route, weight, bias, running_mean, running_var, num_batches_tracked,
                scale, gamma, beta, K, momentum, cumulative, eps, relu, mixed, group):
        branch, mix = (None, route) if mixed else (route, None)
        ctx.K, ctx.mixed, ctx.relu, ctx.group = K, mixed, relu, group
        ctx.dtypes = [None if t is None else t.dtype
                      for t in (x, route, weight, bias, scale, gamma, beta)]
        ctx.kernels = _kernel_path(x)
        if ctx.kernels:
            from .kernels import sync_bn
            y, mean, invstd, planes, payload = sync_bn.sync_bn_forward(
                x, branch, mix, weight, bias, running_mean, running_var, num_batches_tracked,
                scale, gamma, beta, K, momentum, cumulative, eps, relu,
                lambda t: dist.all_reduce(t, group=group), *_rank_and_world(group))
            ctx.save_for_backward(x, route, weight, bias, mean, invstd, scale, gamma, beta,
                                  planes, payload)
            return y
        acc = acc_dtype(x)
        if mixed:
            check_mix_values(mix, "sync_mixed_batch_norm")
        else:
            check_branch_values(branch, K, "sync_multi_batch_norm")
        M = routing_weights(branch, mix, K, acc)                        # [N, K]
        S = x[0, 0].numel() if x.shape[0] and x.shape[1] else 1
        # This rank's per-(k, c) sums about a centre, in fp64; the ranks' are gathered by one
        # all-reduce (each rank fills its own row) and merged exactly: sums Σu, Σu² would
        # cancel (E[u²] − E[u]²) when |mean| ≫ std, and rounded means would lose the cross
        # term.
        f64 = torch.float64
        pc, pr, pq = TorchLeaves.plane_moments(x, acc)                   # [N, C]
        pmean, pm2 = plane_mean_m2(pc, pr, pq, S)
        s = None if scale is None else scale.to(acc)
        ck, Rk, Qk, lcount = Engine.branch_sums(
            M.to(f64), pc.to(f64), pr.to(f64), pq.to(f64), S, None if s is None else s.to(f64))
        C = x.shape[1]
        rank, world = _rank_and_world(group)
        payload = torch.zeros(world, K + 3 * K * C, dtype=f64, device=x.device)
        payload[rank] = torch.cat([lcount, ck.flatten(), Rk.flatten(), Qk.flatten()])
        dist.all_reduce(payload, group=group)                            # the one collective
        count, mean64, var64 = merge_ranks(payload, K, C)
        stat_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        mean, var = mean64.to(stat_dtype), var64.to(stat_dtype)
        new_running = None
        if running_mean is not None:
            new_running = updated_running_stats(running_mean, running_var, num_batches_tracked,
                                                mean64.to(acc), var64.to(acc), count.to(acc),
                                                momentum, cumulative)
        # Normalize with the global statistics: the BN op itself, in its running-stats mode.
        y, mean_used, invstd, _ = torch.ops.fastrobust.multi_bn.default(
            x, branch, mix, weight, bias, mean, var, None, scale, gamma, beta, K, False,
            momentum, False, eps, relu)
        ctx.save_for_backward(x, route, weight, bias, mean_used, invstd, scale, gamma, beta,
                              pmean, pm2, count.to(acc), var64.to(acc))
        ctx.S = S
        if new_running is not None:
            with torch.no_grad():
                running_mean.copy_(new_running[0])
                running_var.copy_(new_running[1])
                if num_batches_tracked is not None:
                    num_batches_tracked.copy_(new_running[2])
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            # The statistics' share of a second derivative would need differentiable
            # all-reduces; refuse rather than drop the term.
            raise NotImplementedError(
                "sync_multi_batch_norm / sync_mixed_batch_norm: double backward "
                "(create_graph=True, e.g. a gradient penalty) is not supported through the "
                "synchronized BN; use sync_bn=False (per-rank statistics) for such losses")
        ng = ctx.needs_input_grad
        need_x, need_mix, need_w, need_b = ng[0], ctx.mixed and ng[1], ng[2], ng[3]
        need_s, need_g, need_be = ng[7], ng[8], ng[9]
        if ctx.kernels:
            return _SyncBN._kernel_backward(ctx, dy, need_x, need_mix, need_w, need_b, need_s,
                                            need_g, need_be)
        (x, route, weight, bias, mean, invstd, scale, gamma, beta, pmean, pm2, count,
         var) = ctx.saved_tensors
        K, mixed, S = ctx.K, ctx.mixed, ctx.S
        branch, mix = (None, route) if mixed else (route, None)
        acc = mean.dtype if mean.dtype == torch.float64 else torch.float32
        # The fused backward with the statistics held fixed: direct terms and local T1, T2.
        # (the BN op's own backward, with batch_stats=False)
        dx_d, dmix_d, T2, T1, ds_d, dg, dbe = torch.ops.fastrobust.multi_bn_backward.default(
            dy, x, branch, mix, weight, bias, mean, invstd, x.new_empty(0), scale, gamma, beta,
            K, False, ctx.relu, [need_x or need_s, need_mix, True, True, need_s, need_g,
                                 need_be])
        T1, T2 = T1.to(acc), T2.to(acc)
        local_w, local_b = T2, T1
        sums = torch.cat([T1.flatten(), T2.flatten()])
        dist.all_reduce(sums, group=ctx.group)                           # the one collective
        T1, T2 = sums[:T1.numel()].view_as(T1), sums[T1.numel():].view_as(T2)
        M = routing_weights(branch, mix, K, acc)
        r = invstd.to(acc)
        mu = mean.to(acc)
        a = r if weight is None else r * weight.to(acc)
        m = torch.where(count != 0, count, 1.0)[:, None]                 # [K, 1]
        # ∂L/∂u += Q·u + R per plane: the statistics' share, -Σ_k M·a/m·(T1 + x̂·T2).
        Q = -_where(M, (a * r * T2 / m)[None]).sum(1)                    # [N, C]
        R = -_where(M, (a * (T1 - r * mu * T2) / m)[None]).sum(1)
        s = None if scale is None else scale.to(acc)
        dx = dmix = ds = None
        if need_x:
            qx, rx = (Q, R) if s is None else (s * s * Q, s * R)
            nd = x.dim()
            dx = (dx_d.to(acc) + _bc(qx, nd) * x.to(acc) + _bc(rx, nd)).to(ctx.dtypes[0])
        if need_s:  # Σ_s x·(Q·s·x + R) from the planes' Σx and Σx²
            sx, sxx = S * pmean, pm2 + S * pmean.square()
            ds = (ds_d.to(acc) + Q * s * sxx + R * sx).to(ctx.dtypes[4])
        if need_mix:  # the statistics' share: -Σ_c a·[T1·(ū - μ) + ½·r·T2·(q - σ²)]/W
            ub = pmean if s is None else s * pmean
            q = (pm2 if s is None else s * s * pm2) / S
            du = ub[:, None, :] - mu[None]                                # [N, K, C]
            W = (count / S)
            W = torch.where(W != 0, W, 1.0)[None, :, None]
            stat = (a[None] * (T1[None] * du + 0.5 * r[None] * T2[None] *
                               (q[:, None, :] + du.square() - var[None])) / W).sum(2)
            dmix = (dmix_d.to(acc) - stat).to(ctx.dtypes[1])
        dw = local_w.to(ctx.dtypes[2]) if need_w else None
        db = local_b.to(ctx.dtypes[3]) if need_b else None
        dg = dg.to(ctx.dtypes[5]) if need_g else None
        dbe = dbe.to(ctx.dtypes[6]) if need_be else None
        return (dx, dmix, dw, db, None, None, None, ds, dg, dbe) + (None,) * 7

    @staticmethod
    def _kernel_backward(ctx, dy, need_x, need_mix, need_w, need_b, need_s, need_g, need_be):
        """The Triton backward: grad sums → local T1, T2 → the all-reduce → the per-plane
        results from the global sums and dx in one kernel (3 launches and the collective)."""
        from .kernels import multi_bn as kernels
        x, route, weight, bias, mean, invstd, scale, gamma, beta, planes, payload = \
            ctx.saved_tensors
        branch, mix = (None, route) if ctx.mixed else (route, None)
        group = ctx.group
        needs = (need_x, need_mix, need_w, need_b, need_s, need_g, need_be)
        grads = kernels.bn_backward(
            dy, x, branch, mix, weight, bias, mean, invstd, planes, scale, gamma, beta, ctx.K,
            True, ctx.relu, needs, all_reduce=lambda t: dist.all_reduce(t, group=group),
            payload=payload)
        dx, dmix, dw, db, ds, dg, dbe = (
            t.to(dt) if need else None
            for t, need, dt in zip(grads, needs, ctx.dtypes))
        return (dx, dmix, dw, db, None, None, None, ds, dg, dbe) + (None,) * 7


def _sync(op, x, route, weight, bias, running_mean, running_var, momentum, eps,
          num_batches_tracked, input_scale, film_gamma, film_beta, activation, K, mixed,
          process_group):
    from .functional import _check_bn_args, _check_eps_momentum, _check_x, _per_sample_arg

    _check_x(op, x)
    _check_bn_args(op, x, K, weight, bias, running_mean, running_var, momentum,
                   num_batches_tracked, True, activation)
    eps, momentum = _check_eps_momentum(op, eps, momentum)
    extras = [_per_sample_arg(op, n, t, x) for n, t in (
        ("input_scale", input_scale), ("film_gamma", film_gamma), ("film_beta", film_beta))]
    cumulative = momentum is None
    return _SyncBN.apply(x, route, weight, bias, running_mean, running_var,
                         num_batches_tracked, *extras, K, 0.0 if cumulative else float(momentum),
                         cumulative, float(eps), activation == "relu", mixed, process_group)


def sync_multi_batch_norm(x: Tensor, branch: Tensor, weight: Tensor | None = None,
                          bias: Tensor | None = None, running_mean: Tensor | None = None,
                          running_var: Tensor | None = None, *, momentum: float | None = 0.1,
                          eps: float = 1e-5, num_branches: int | None = None,
                          num_batches_tracked: Tensor | None = None,
                          input_scale: Tensor | None = None, film_gamma: Tensor | None = None,
                          film_beta: Tensor | None = None, activation: str | None = None,
                          process_group=None) -> Tensor:
    """`functional.multi_batch_norm` in training with statistics over every rank of
    ``process_group`` (the default group when None): one all-reduce forward, one backward.
    Arguments as there; every rank must call it (a collective)."""
    op = "sync_multi_batch_norm"
    if not isinstance(branch, Tensor) or branch.dtype.is_floating_point or \
            branch.shape != (x.shape[0],):
        raise ValueError(f"{op}: branch must be an integer tensor of shape [N]")
    K = num_branches
    for t in (weight, bias, running_mean, running_var):
        if K is None and isinstance(t, Tensor):
            K = t.shape[0]
    if K is None:
        raise ValueError(f"{op}: pass num_branches when weight, bias and running stats are "
                         "all None")
    return _sync(op, x, branch.long(), weight, bias, running_mean, running_var, momentum, eps,
                 num_batches_tracked, input_scale, film_gamma, film_beta, activation, K, False,
                 process_group)


def sync_mixed_batch_norm(x: Tensor, mix: Tensor, weight: Tensor | None = None,
                          bias: Tensor | None = None, running_mean: Tensor | None = None,
                          running_var: Tensor | None = None, *, momentum: float | None = 0.1,
                          eps: float = 1e-5, num_batches_tracked: Tensor | None = None,
                          input_scale: Tensor | None = None, film_gamma: Tensor | None = None,
                          film_beta: Tensor | None = None, activation: str | None = None,
                          process_group=None) -> Tensor:
    """`functional.mixed_batch_norm` in training with mix-weighted statistics over every rank
    of ``process_group``: one all-reduce forward, one backward. Arguments as there."""
    op = "sync_mixed_batch_norm"
    if not isinstance(mix, Tensor) or mix.dim() != 2 or mix.shape[0] != x.shape[0] or \
            not mix.dtype.is_floating_point:
        raise ValueError(f"{op}: mix must be a floating-point [N, K] tensor")
    return _sync(op, x, mix, weight, bias, running_mean, running_var, momentum, eps,
                 num_batches_tracked, input_scale, film_gamma, film_beta, activation,
                 mix.shape[1], True, process_group)
