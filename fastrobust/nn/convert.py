"""Conversions of a model's batch norms: plain BN to multi-branch (`convert_multi_bn`), and
multi-branch to synchronized (`convert_sync_multi_bn`). Both kinds of module are imported
here, so neither module file imports the other."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .multi_bn import (MixedBatchNorm2d, MultiBatchNorm1d, MultiBatchNorm2d,
                       _check_num_branches)
from .sync import SyncMixedBatchNorm2d, SyncMultiBatchNorm2d, _Sync

__all__ = ["convert_multi_bn", "convert_sync_multi_bn"]


def convert_multi_bn(module: nn.Module, num_branches: int = 2) -> nn.Module:
    """Replaces every batch norm in ``module`` by a multi-branch one with ``num_branches``
    branches, each starting from the original's parameters and statistics: ``nn.BatchNorm2d``
    by :class:`MultiBatchNorm2d`, ``nn.BatchNorm1d`` by :class:`MultiBatchNorm1d`,
    ``nn.SyncBatchNorm`` by :class:`~fastrobust.nn.SyncMultiBatchNorm2d` (4-D inputs). A lazy
    BN that has not seen its input yet, and ``nn.BatchNorm3d``, are refused with a clear error
    rather than left unconverted. Converts in place and returns the module (a new one if
    ``module`` is itself a BN), like ``nn.SyncBatchNorm.convert_sync_batchnorm``."""
    _check_num_branches("convert_multi_bn", num_branches)  # before anything is converted
    return _convert(module, num_branches, "")


def convert_sync_multi_bn(module: nn.Module, process_group=None) -> nn.Module:
    """Replaces every multi-branch BN in ``module`` by its synchronized twin (a
    :class:`MixedBatchNorm2d` by :class:`SyncMixedBatchNorm2d`, any other
    :class:`MultiBatchNorm2d` by :class:`SyncMultiBatchNorm2d`) with the same parameters,
    buffers, requires_grad flags and mode, in place (a new module if ``module`` is itself one),
    like ``nn.SyncBatchNorm.convert_sync_batchnorm``. Call it before wrapping the model in
    DDP."""
    if isinstance(module, MultiBatchNorm2d) and not isinstance(module, _Sync):
        cls = SyncMixedBatchNorm2d if isinstance(module, MixedBatchNorm2d) else \
            SyncMultiBatchNorm2d
        return _replace(module, cls, module.num_branches,
                        lambda new: new.load_state_dict(module.state_dict()),
                        process_group=process_group)
    return _children(module, lambda child, _: convert_sync_multi_bn(child, process_group))


def _convert(module: nn.Module, num_branches: int, name: str) -> nn.Module:
    where = f" ({name})" if name else ""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and \
            isinstance(module, nn.modules.batchnorm._NormBase):
        raise TypeError(f"convert_multi_bn: {type(module).__name__}{where} has not seen an "
                        "input yet, so its number of channels is unknown: run one forward "
                        "pass first (it then becomes a plain BN), then convert")
    if isinstance(module, nn.BatchNorm3d):
        raise TypeError(f"convert_multi_bn: {type(module).__name__}{where} is not supported "
                        "(the multi-branch modules take [N, C], [N, C, L] and [N, C, H, W])")
    extra = {}
    if isinstance(module, nn.SyncBatchNorm):
        cls, extra["process_group"] = SyncMultiBatchNorm2d, module.process_group
    elif isinstance(module, nn.BatchNorm2d):
        cls = MultiBatchNorm2d
    elif isinstance(module, nn.BatchNorm1d):
        cls = MultiBatchNorm1d
    else:
        return _children(module, lambda child, child_name: _convert(
            child, num_branches, f"{name}.{child_name}" if name else child_name))

    def fill(new):  # every branch starts from the one BN's parameters and statistics
        for entry in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            src, dst = getattr(module, entry), getattr(new, entry)
            if src is not None and dst is not None:
                dst.copy_(src.expand_as(dst))
    return _replace(module, cls, num_branches, fill, **extra)


def _replace(module: nn.Module, cls, num_branches: int, fill: Callable[[nn.Module], object],
             **extra) -> nn.Module:
    """A ``cls`` of ``num_branches`` branches with ``module``'s hyperparameters, device and
    dtype, its state set by ``fill(new)`` (under no_grad), and ``module``'s requires_grad
    flags and mode."""
    ref = module.weight if module.weight is not None else module.running_mean
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = cls(module.num_features, num_branches, eps=module.eps, momentum=module.momentum,
              affine=module.affine, track_running_stats=module.track_running_stats,
              **extra, **kw)
    with torch.no_grad():
        fill(new)
    if new.affine:
        new.weight.requires_grad_(module.weight.requires_grad)
        new.bias.requires_grad_(module.bias.requires_grad)
    new.train(module.training)
    return new


def _children(module: nn.Module, convert: Callable[[nn.Module, str], nn.Module]) -> nn.Module:
    """``module`` with each child replaced by ``convert(child, its name)`` where that gives a
    new module."""
    for child_name, child in module.named_children():
        new_child = convert(child, child_name)
        if new_child is not child:
            setattr(module, child_name, new_child)
    return module
