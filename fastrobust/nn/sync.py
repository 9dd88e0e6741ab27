"""Synchronized multi-branch batch norm modules for DDP (fastrobust.distributed)."""
from __future__ import annotations

from torch import Tensor

from .. import distributed as D
from .multi_bn import MixedBatchNorm2d, MultiBatchNorm2d

__all__ = ["SyncMultiBatchNorm2d", "SyncMixedBatchNorm2d"]


class _Sync:
    """Forward of a synchronized module: batch statistics over every rank of
    ``process_group`` when training (or with no running stats) under an initialized process
    group of more than one rank; the single-process op otherwise (eval, one process)."""

    process_group = None

    def forward(self, x: Tensor, branch: Tensor | int | None = None, mix: Tensor | None = None,
                *, input_scale: Tensor | None = None, film_gamma: Tensor | None = None,
                film_beta: Tensor | None = None, activation: str | None = None) -> Tensor:
        batch_stats = self.training or self.running_mean is None
        if not (batch_stats and D.sync_active(self.process_group)):
            return super().forward(x, branch, mix, input_scale=input_scale,
                                   film_gamma=film_gamma, film_beta=film_beta,
                                   activation=activation)
        self._check_input(x)
        kind, route = self._route(x, branch, mix)
        # In eval without running stats nothing is updated (they are None).
        kw = dict(momentum=self.momentum, eps=self.eps,
                  num_batches_tracked=self.num_batches_tracked if self.training else None,
                  input_scale=input_scale, film_gamma=film_gamma, film_beta=film_beta,
                  activation=activation, process_group=self.process_group)
        rm, rv = (self.running_mean, self.running_var) if self.training else (None, None)
        if kind == "mix":
            return D.sync_mixed_batch_norm(x, route, self.weight, self.bias, rm, rv, **kw)
        return D.sync_multi_batch_norm(x, route, self.weight, self.bias, rm, rv,
                                       num_branches=self.num_branches, **kw)


class SyncMultiBatchNorm2d(_Sync, MultiBatchNorm2d):
    """:class:`MultiBatchNorm2d` whose training statistics are those of the global batch of a
    data-parallel run (one all-reduce per layer forward, one backward), like
    ``nn.SyncBatchNorm`` for one branch. ``process_group``: None for the default group."""

    def __init__(self, num_features: int, num_branches: int = 2, *args, process_group=None,
                 **kwargs):
        super().__init__(num_features, num_branches, *args, **kwargs)
        self.process_group = process_group


class SyncMixedBatchNorm2d(_Sync, MixedBatchNorm2d):
    """:class:`MixedBatchNorm2d` with statistics over the global batch (mix-weighted, or per
    branch under hard routing)."""

    def __init__(self, num_features: int, num_branches: int = 2, *args, process_group=None,
                 **kwargs):
        super().__init__(num_features, num_branches, *args, **kwargs)
        self.process_group = process_group
