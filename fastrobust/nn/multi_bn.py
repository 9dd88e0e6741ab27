"""Drop-in multi-branch batch norm modules (shared/DESIGN.md §3)."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .. import functional as F

__all__ = ["MultiBatchNorm2d", "DualBatchNorm2d", "convert_multi_bn", "routing"]


class MultiBatchNorm2d(nn.Module):
    """``nn.BatchNorm2d`` with K branches: sample n is normalized by branch ``branch[n]``.

    Parameters and buffers are ``[K, C]`` (``num_batches_tracked`` is ``[K]``: each branch
    counts the batches that updated it). Route a call explicitly with ``bn(x, branch=...)``, or
    every such module in a model at once with ``with routing(model, branch=...)``; ``branch``
    is an int64 ``[N]`` tensor or one int for the whole batch. A ``[C]`` state dict of a plain
    ``nn.BatchNorm2d`` loads into every branch.
    """

    def __init__(self, num_features: int, num_branches: int = 2, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        if num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {num_branches}")
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.num_branches = num_features, num_branches
        self.eps, self.momentum = eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        shape = (num_branches, num_features)
        if affine:
            self.weight = nn.Parameter(torch.ones(shape, **kw))
            self.bias = nn.Parameter(torch.zeros(shape, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(shape, **kw))
            self.register_buffer("running_var", torch.ones(shape, **kw))
            self.register_buffer("num_batches_tracked",
                                 torch.zeros(num_branches, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._routing: Tensor | int | None = None

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _branch(self, x: Tensor, branch) -> Tensor:
        if branch is None:
            branch = self._routing
        if branch is None:
            if self.num_branches == 1:
                branch = 0
            else:
                raise RuntimeError(
                    f"{type(self).__name__} has {self.num_branches} branches but no routing: "
                    "call bn(x, branch=...) or wrap the model call in "
                    "`with fastrobust.nn.routing(model, branch=...)`")
        if isinstance(branch, int):
            if not 0 <= branch < self.num_branches:
                raise ValueError(f"branch {branch} is out of range [0, {self.num_branches})")
            return torch.full((x.shape[0],), branch, dtype=torch.long, device=x.device)
        return branch

    def forward(self, x: Tensor, branch: Tensor | int | None = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects 4D input [N, C, H, W], "
                             f"got {x.dim()}D input")
        return F.multi_batch_norm(
            x, self._branch(x, branch), self.weight, self.bias, self.running_mean,
            self.running_var, training=self.training, momentum=self.momentum, eps=self.eps,
            num_branches=self.num_branches, num_batches_tracked=self.num_batches_tracked)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A plain BatchNorm's [C] tensors (and scalar counter) load into every branch.
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            key, own = prefix + name, getattr(self, name)
            if key in state_dict and own is not None and state_dict[key].dim() == own.dim() - 1:
                state_dict[key] = state_dict[key].expand_as(own).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_branches={self.num_branches}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class DualBatchNorm2d(MultiBatchNorm2d):
    """Dual BN (OAT, AW-Net): branch ``CLEAN`` = 0 for clean samples, ``ADV`` = 1 for
    adversarial ones."""

    CLEAN, ADV = 0, 1

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, 2, **kwargs)


def convert_multi_bn(module: nn.Module, num_branches: int = 2) -> nn.Module:
    """Replaces every ``nn.BatchNorm2d`` in ``module`` by a :class:`MultiBatchNorm2d` with
    ``num_branches`` branches, each starting from the original's parameters and statistics.
    Converts in place and returns the module (a new one if ``module`` is itself a BN), like
    ``nn.SyncBatchNorm.convert_sync_batchnorm``."""
    if isinstance(module, nn.BatchNorm2d):
        ref = module.weight if module.weight is not None else module.running_mean
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        new = MultiBatchNorm2d(module.num_features, num_branches, module.eps, module.momentum,
                               module.affine, module.track_running_stats, **kw)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(module, name), getattr(new, name)
                if src is not None and dst is not None:
                    dst.copy_(src.expand_as(dst))
            if new.affine:
                new.weight.requires_grad_(module.weight.requires_grad)
                new.bias.requires_grad_(module.bias.requires_grad)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_multi_bn(child, num_branches)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


@contextlib.contextmanager
def routing(model: nn.Module, branch: Tensor | int | None = None):
    """Routes every multi-branch BN inside ``model`` for the calls in the body::

        with routing(model, branch=is_adv.long()):
            logits = model(x)

    ``branch`` is an int64 ``[N]`` tensor or one int for the whole batch. Routing set before
    (an outer ``routing``) is restored on exit.
    """
    mods = [m for m in model.modules() if isinstance(m, MultiBatchNorm2d)]
    if not mods:
        raise ValueError("routing(): the model has no multi-branch batch norm; "
                         "convert it first with fastrobust.nn.convert_multi_bn(model)")
    if branch is None:
        raise ValueError("routing(): pass branch=")
    saved = [m._routing for m in mods]
    for m in mods:
        m._routing = branch
    try:
        yield model
    finally:
        for m, old in zip(mods, saved):
            m._routing = old
