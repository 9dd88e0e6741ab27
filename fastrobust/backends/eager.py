"""The eager backend: the ops in plain PyTorch (fastrobust/ops/<family>/eager.py). Registered
for CompositeExplicitAutograd, so it serves every device that has no kernel of its own (MPS,
XPU, CUDA without Triton, ...), and any device when forced."""
from __future__ import annotations

import torch

from ..ops import eager_implementations as implementations  # noqa: F401


def reasons(op: str, device: torch.device) -> list[str]:
    return []
