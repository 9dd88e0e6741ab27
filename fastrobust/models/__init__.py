"""Model definitions: CIFAR-style ResNets with plain BN (for `convert_multi_bn`), and the OAT
forms of ResNet and Wide-ResNet (λ-conditioned FiLM, dual BN, fused ops)."""
from .afa import AFAResNet, WeightGenerator, afa_resnet18
from .awnet import AdversarialDetector, AWNetResNet, ResNetFeatures, awnet_resnet18
from .oat import (S1, LambdaEncoding, OATResNet, OATWideResNet, oat_resnet18, oat_resnet34,
                  oat_wrn16_8, oat_wrn28_10, oat_wrn40_2, oats_resnet18, oats_resnet34)
from .oat_repo import OAT_REPO_ARCHS, from_oat_repo
from .resnet import BasicBlock, ResNet, resnet18

__all__ = ["ResNet", "BasicBlock", "resnet18", "S1", "LambdaEncoding", "OATResNet",
           "OATWideResNet", "oat_resnet18", "oat_resnet34", "oat_wrn16_8", "oat_wrn28_10",
           "oat_wrn40_2", "from_oat_repo", "OAT_REPO_ARCHS",
           "oats_resnet18", "oats_resnet34", "AFAResNet", "WeightGenerator", "afa_resnet18",
           "AdversarialDetector", "AWNetResNet", "ResNetFeatures", "awnet_resnet18"]
