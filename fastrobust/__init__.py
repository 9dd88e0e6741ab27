"""fastrobust: fused kernels for accuracy/robustness trade-off training in PyTorch."""
__version__ = "0.1.0"

from . import _ops, attacks, backends, functional, nn  # noqa: E402,F401 - _ops registers the ops

__all__ = ["functional", "nn", "attacks", "backends", "__version__"]
