"""The eager forms users write today, kept as the baselines of benchmarks and the demo.

These are deliberately the slow, straightforward versions: each branch's samples are sliced or
gathered out, run through their own nn.BatchNorm2d, and put back together.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def oat_dual_bn(x: Tensor, n_clean: int, bn_clean: nn.Module, bn_adv: nn.Module) -> Tensor:
    """The OAT repository's dual BN: the batch is sorted clean-first; slice, two BNs, cat."""
    return torch.cat([bn_clean(x[:n_clean]), bn_adv(x[n_clean:])], 0)


def eager_kway_bn(x: Tensor, indices: list[Tensor], bns) -> Tensor:
    """K-way routing with index_select / index_copy: `indices[k]` holds branch k's samples
    (computed per batch with a nonzero(), i.e. a host sync, in real code)."""
    out = torch.empty_like(x)
    for idx, bn in zip(indices, bns):
        out = out.index_copy(0, idx, bn(x.index_select(0, idx)))
    return out


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


def eager_mixed_bn(x: Tensor, mix: Tensor, bns) -> Tensor:
    """AW-Net's / AFA's soft mixing as written today: every BN over the whole batch, then the
    per-sample weighted sum Σ_k mix[:, k]·BN_k(x) (K full passes plus K multiply-adds)."""
    out = 0
    for k, bn in enumerate(bns):
        out = out + mix[:, k, None, None, None] * bn(x)
    return out


def eager_film(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """FiLM as a broadcasting expression (OAT's FiLM layer)."""
    return x * gamma[:, :, None, None] + beta[:, :, None, None]


def eager_bn_film_relu(x: Tensor, bn: nn.Module, gamma: Tensor, beta: Tensor) -> Tensor:
    """OAT's block tail as three modules: BN, then FiLM, then ReLU (three passes)."""
    return torch.relu(eager_film(bn(x), gamma, beta))


def eager_scaled_bn(y: Tensor, omega: Tensor, bn: nn.Module) -> Tensor:
    """AW-Net's filter scaling as written today: the conv output times ω[n, c] is written to
    memory, then normalized."""
    return bn(y * omega[:, :, None, None])
