"""Model definitions (CIFAR-style ResNets)."""
from .resnet import BasicBlock, ResNet, resnet18

__all__ = ["ResNet", "BasicBlock", "resnet18"]
