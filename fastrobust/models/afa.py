"""AFA (Adaptive Feature Alignment) form of the CIFAR ResNet: every BN is a K-way BN, one branch
per attack strength (BN_0 clean ... BN_{K-1} the strongest), through the fused ops (BN → ReLU
in one pass, the residual add and its ReLU in one).

    model = afa_resnet18(num_classes=10, num_branches=5)
    logits = model(x, branch=b)          # stage I: sample n through the BNs of branch b[n]
    model.stage = 2                      # stage II: the weight generator mixes BN_0, BN_{K-1}
    logits, w0 = model(x, return_weight=True)

Stage II: a weight generator (two Conv-BN-ReLU blocks, global average pooling, Linear-ReLU,
Linear, sigmoid) reads the stem convolution's output, the first intermediate feature, so every
BN of the network, the stem's included, can be mixed: per sample, W0 = WG(feature) and each
BN gives W0·BN_0(x) + (1 − W0)·BN_{K-1}(x) (`mixed_batch_norm` with the middle branches at
zero weight, which the kernels skip).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..functional import add_relu
from ..nn import MultiBatchNorm2d, routing

__all__ = ["WeightGenerator", "AFAResNet", "afa_resnet18"]


class WeightGenerator(nn.Module):
    """AFA's weight generator: (Conv3×3 → BN → ReLU) ×2, global average pooling, Linear →
    ReLU, Linear, sigmoid: one fusing weight W0 ∈ (0, 1) per sample."""

    def __init__(self, in_channels: int, hidden: int = 32):
        super().__init__()
        # one-branch BNs: the fused BN·ReLU, and synchronized under DDP like the others
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, 1, 1, bias=False)
        self.bn1 = MultiBatchNorm2d(hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, 2, 1, bias=False)
        self.bn2 = MultiBatchNorm2d(hidden, 1)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, feature: Tensor) -> Tensor:
        h = self.bn1(self.conv1(feature), branch=0, activation="relu")
        h = self.bn2(self.conv2(h), branch=0, activation="relu")
        pooled = nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)
        return torch.sigmoid(self.head(pooled)).squeeze(1)


class _Block(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, K: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = MultiBatchNorm2d(planes, K)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = MultiBatchNorm2d(planes, K)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          MultiBatchNorm2d(planes, K))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x), activation="relu")))
        return add_relu(out, x if self.shortcut is None else self.shortcut(x))


class AFAResNet(nn.Module):
    """CIFAR ResNet with K-way BN (``num_branches`` strengths) and AFA's weight generator.
    ``stage`` 1: the BNs follow ``branch`` (or an outer `routing` context); ``stage`` 2: the
    generator's W0 mixes BN_0 and BN_{K-1} in every BN."""

    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, width: int = 64,
                 in_channels: int = 3, num_branches: int = 5, wg_hidden: int = 32):
        super().__init__()
        if num_branches < 2:
            raise ValueError(f"AFA needs at least 2 branches (clean and strongest), got "
                             f"{num_branches}")
        K = self.num_branches = num_branches
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = MultiBatchNorm2d(width, K)
        layers, in_planes = [], width
        for i, n in enumerate(blocks):
            planes = width * 2 ** i
            for j in range(n):
                layers.append(_Block(in_planes, planes, 2 if (i > 0 and j == 0) else 1, K))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        self.generator = WeightGenerator(width, wg_hidden)
        self.stage = 1

    def mix_of(self, w0: Tensor) -> Tensor:
        """[N, K] mixing weights: W0 on BN_0, 1 − W0 on BN_{K-1}, zero on the others."""
        cols = [w0] + [torch.zeros_like(w0)] * (self.num_branches - 2) + [1 - w0]
        return torch.stack(cols, 1)

    def forward(self, x: Tensor, branch: Tensor | int | None = None,
                return_weight: bool = False):
        h = self.conv1(x)
        w0 = None
        if branch is not None:
            ctx = routing(self, branch=branch)
        elif self.stage == 2:
            w0 = self.generator(h)
            ctx = routing(self, mix=self.mix_of(w0))
        else:  # stage I under an outer routing context (e.g. an attack's branch=)
            ctx = contextlib.nullcontext()
        with ctx:
            out = self.layers(self.bn1(h, activation="relu"))
            logits = self.fc(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))
        if return_weight:
            if w0 is None:
                raise RuntimeError("return_weight needs stage 2 (the weight generator)")
            return logits, w0
        return logits

    def freeze_for_stage2(self) -> list[nn.Parameter]:
        """Stage II: everything but the generator frozen (parameters and BN statistics: the
        base model stays in eval mode, see `train`); returns the generator's parameters."""
        self.stage = 2
        for p in self.parameters():
            p.requires_grad_(False)
        params = list(self.generator.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    def train(self, mode: bool = True):
        super().train(mode)
        if self.stage == 2:  # the frozen base keeps its running statistics
            own = {id(m) for m in self.generator.modules()}
            for m in self.modules():
                if isinstance(m, MultiBatchNorm2d) and id(m) not in own:
                    m.train(False)
        return self


def afa_resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3,
                 num_branches: int = 5, wg_hidden: int = 32) -> AFAResNet:
    """AFA ResNet-18 (CIFAR form); ``width`` scales every stage (64 is the standard model)."""
    return AFAResNet((2, 2, 2, 2), num_classes, width, in_channels, num_branches, wg_hidden)
