"""The OAT repository's eager dual BN (slice the batch, two BNs, cat), which `fastrobust speed`
times the fused op against (the other eager baselines, of every benchmark, are in
benchmarks/baselines.py)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def oat_dual_bn(x: Tensor, n_clean: int, bn_clean: nn.Module, bn_adv: nn.Module) -> Tensor:
    """The OAT repository's dual BN: the batch is sorted clean-first; slice, two BNs, cat."""
    return torch.cat([bn_clean(x[:n_clean]), bn_adv(x[n_clean:])], 0)


class EagerDualBatchNorm2d(nn.Module):
    """OAT-style dual BN module: set `n_clean` (clean samples at the front of the batch)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.bn_clean = nn.BatchNorm2d(num_features)
        self.bn_adv = nn.BatchNorm2d(num_features)
        self.n_clean = 0

    def forward(self, x: Tensor) -> Tensor:
        return oat_dual_bn(x, self.n_clean, self.bn_clean, self.bn_adv)


def to_eager_dual_bn(module: nn.Module) -> nn.Module:
    """Replaces every nn.BatchNorm2d with an EagerDualBatchNorm2d (for comparisons)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, EagerDualBatchNorm2d(child.num_features))
        else:
            to_eager_dual_bn(child)
    return module
