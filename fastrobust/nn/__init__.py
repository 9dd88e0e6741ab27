"""Drop-in modules built on the fused ops."""
from .multi_bn import DualBatchNorm2d, MultiBatchNorm2d, convert_multi_bn, routing

__all__ = ["MultiBatchNorm2d", "DualBatchNorm2d", "convert_multi_bn", "routing"]
