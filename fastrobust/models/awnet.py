"""AW-Net (Adversarial Weight-Varied Network) form of the CIFAR ResNet-18.

Two parts:

- the dynamic-weight network: basic blocks whose two convolutions have their filters scaled
  per sample by regulation signals ω_j[n, :] and whose BNs are MixBN (a clean and an
  adversarial branch). conv(x, ω ⊙ W) = ω·conv(x, W) for a bias-free conv, so the scaling is
  the fused input scale of the BN op (`ScaledConvBN`): the scaled output is never written;
- the adversarial detector: a frozen feature extractor giving ψ per sample (512-d for a
  standard ResNet-18), a type head (linear → softmax: P_type, clean vs adversarial) and one
  signal head per scaled conv, ω_j = (tanh(W_j ψ) + 1)^β (β = 4 by default; the heads start at
  zero, so ω = 1).

MixBN: in training the sample type is known and routes hard (clean → BN_nat = branch 0,
adversarial → BN_adv = branch 1); otherwise each BN is (1 − P)·BN_adv + P·BN_nat with the
detector's P = P_type(clean), one `mixed_batch_norm` pass.

    model = awnet_resnet18(extractor=teacher_features, feature_dim=512)
    logits = model(x)                                   # soft MixBN from the detector
    logits, type_logits = model(torch.cat([x, x_adv]), is_adv=types, return_type=True)
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..functional import add_relu
from ..nn import MultiBatchNorm2d, ScaledConvBN, routing
from .resnet import ResNet

__all__ = ["ResNetFeatures", "AdversarialDetector", "AWNetResNet", "awnet_resnet18"]

NAT, ADV = 0, 1


class ResNetFeatures(nn.Module):
    """The pooled penultimate features of a `fastrobust.models.ResNet` (its classifier
    dropped): [N, 8·width], 512 for the standard ResNet-18. A frozen extractor never changes
    its BN statistics, so by default (``fold_bn``) every BN is folded into the conv before it
    (exact up to rounding; the attacks' forward and backward through ψ then skip 20 BN
    passes each) and the residual add and ReLU are one pass."""

    def __init__(self, resnet: ResNet, fold_bn: bool = True):
        super().__init__()
        self.dim = resnet.fc.in_features
        self.fold_bn = fold_bn
        if not fold_bn:
            self.net = resnet
            return

        def fold(conv, bn):  # on copies: the teacher's own modules stay as they are
            return fuse_conv_bn_eval(copy.deepcopy(conv).eval(), copy.deepcopy(bn).eval())

        self.stem = fold(resnet.conv1, resnet.bn1)
        self.blocks = nn.ModuleList()
        for blk in resnet.layers:
            b = nn.Module()
            b.c1, b.c2 = fold(blk.conv1, blk.bn1), fold(blk.conv2, blk.bn2)
            b.sc = fold(blk.shortcut[0], blk.shortcut[1]) if len(blk.shortcut) else None
            self.blocks.append(b)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fold_bn:
            r = self.net
            out = r.layers(r.relu(r.bn1(r.conv1(x))))
            return nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
        out = torch.relu(self.stem(x))
        for b in self.blocks:
            h = b.c2(torch.relu(b.c1(out)))
            out = add_relu(h, out if b.sc is None else b.sc(out))
        return nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)


class AdversarialDetector(nn.Module):
    """ψ = extractor(x) (frozen: no gradient to its parameters, always in eval mode, but
    differentiable in x so that white-box attacks see it), the type head and the signal
    heads. ``forward(x) -> (type_logits [N, 2], [ω_j [N, C_j] for each scaled conv])``."""

    def __init__(self, extractor: nn.Module, feature_dim: int, signal_channels, beta: float = 4.0):
        super().__init__()
        self.extractor = extractor
        for p in self.extractor.parameters():
            p.requires_grad_(False)
        self.beta = float(beta)
        self.type_head = nn.Linear(feature_dim, 2)
        self.signal_heads = nn.ModuleList(nn.Linear(feature_dim, c) for c in signal_channels)
        for h in self.signal_heads:  # ω = 1 at the start: the plain network
            nn.init.zeros_(h.weight)
            nn.init.zeros_(h.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.extractor.train(False)  # frozen, statistics included
        return self

    def forward(self, x: Tensor):
        psi = self.extractor(x)
        omegas = [(torch.tanh(h(psi)) + 1).pow(self.beta) for h in self.signal_heads]
        return self.type_head(psi), omegas


class _AWBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, K: int = 2):
        super().__init__()
        self.sc1 = ScaledConvBN(nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False),
                                MultiBatchNorm2d(planes, K))
        self.sc2 = ScaledConvBN(nn.Conv2d(planes, planes, 3, 1, 1, bias=False),
                                MultiBatchNorm2d(planes, K))
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          MultiBatchNorm2d(planes, K))

    def forward(self, x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
        out = self.sc2(self.sc1(x, w1, activation="relu"), w2)
        return add_relu(out, x if self.shortcut is None else self.shortcut(x))


class AWNetResNet(nn.Module):
    """The dynamic-weight CIFAR ResNet with MixBN and its adversarial detector.

    The paper's Table 3 ablations: ``mix_bn=False`` builds one BN per layer instead of MixBN
    (the dynamic weights only; every sample through it, in training and at test time);
    ``test_bn = "adv"`` (an attribute, switchable on a trained model) keeps MixBN in training
    but uses BN_adv alone outside it, instead of the detector's mixing ("detector")."""

    TEST_BN = ("detector", "adv")

    def __init__(self, extractor: nn.Module, feature_dim: int, blocks=(2, 2, 2, 2),
                 num_classes: int = 10, width: int = 64, in_channels: int = 3,
                 beta: float = 4.0, mix_bn: bool = True):
        super().__init__()
        self.mix_bn, self.test_bn = mix_bn, "detector"
        K = 2 if mix_bn else 1
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = MultiBatchNorm2d(width, K)
        layers, channels, in_planes = [], [], width
        for i, n in enumerate(blocks):
            planes = width * 2 ** i
            for j in range(n):
                layers.append(_AWBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, K))
                channels += [planes, planes]
                in_planes = planes
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(in_planes, num_classes)
        self.detector = AdversarialDetector(extractor, feature_dim, channels, beta)

    @staticmethod
    def mix_of(type_logits: Tensor) -> Tensor:
        """[N, 2] MixBN weights from the type logits: P on BN_nat, 1 − P on BN_adv."""
        return torch.softmax(type_logits, 1)

    def forward(self, x: Tensor, is_adv: Tensor | None = None, return_type: bool = False):
        """``is_adv`` (int/bool ``[N]``, training): hard MixBN routing by the known type;
        None: soft mixing by the detector's P_type (BN_adv alone with ``test_bn = "adv"``).
        Without MixBN every sample goes through the one BN."""
        type_logits, omegas = self.detector(x)
        if not self.mix_bn:
            ctx = routing(self, branch=NAT)
        elif is_adv is not None:
            ctx = routing(self, branch=is_adv.long())
        elif self.test_bn == "adv":
            ctx = routing(self, branch=ADV)
        elif self.test_bn == "detector":
            ctx = routing(self, mix=self.mix_of(type_logits))
        else:
            raise ValueError(f"test_bn must be one of {self.TEST_BN}, got {self.test_bn!r}")
        with ctx:
            h = self.bn1(self.conv1(x), activation="relu")
            for j, blk in enumerate(self.layers):
                h = blk(h, omegas[2 * j], omegas[2 * j + 1])
            logits = self.fc(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))
        return (logits, type_logits) if return_type else logits


def awnet_resnet18(extractor: nn.Module, feature_dim: int, num_classes: int = 10,
                   width: int = 64, in_channels: int = 3, beta: float = 4.0,
                   mix_bn: bool = True) -> AWNetResNet:
    """AW-Net ResNet-18 (CIFAR form) around a frozen feature extractor of ``feature_dim``."""
    return AWNetResNet(extractor, feature_dim, (2, 2, 2, 2), num_classes, width, in_channels,
                       beta, mix_bn)
