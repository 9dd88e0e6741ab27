"""fastrobust: fused kernels for accuracy/robustness trade-off training in PyTorch."""
__version__ = "0.1.0"

from . import attacks, backends, functional, nn, ops  # noqa: E402,F401 - ops registers the ops

__all__ = ["functional", "nn", "attacks", "backends", "__version__"]
