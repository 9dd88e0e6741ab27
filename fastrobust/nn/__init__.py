"""Drop-in modules (docs/ops.md)."""
from .convert import convert_multi_bn, convert_sync_multi_bn
from .multi_bn import (DualBatchNorm2d, FiLM, MixedBatchNorm2d, MultiBatchNorm1d,
                       MultiBatchNorm2d, ScaledConvBN, routing)
from .sync import SyncMixedBatchNorm2d, SyncMultiBatchNorm2d

__all__ = ["MultiBatchNorm2d", "MultiBatchNorm1d", "DualBatchNorm2d", "MixedBatchNorm2d", "FiLM",
           "ScaledConvBN", "convert_multi_bn", "routing", "SyncMultiBatchNorm2d",
           "SyncMixedBatchNorm2d", "convert_sync_multi_bn"]
