"""The C++ backend: fastrobust._C's CPU kernels (csrc/<family>/cpu.cpp), registered in C++
for the CPU dispatch key (csrc/<family>/ops.cpp). float32/float64 run natively; other dtypes
are computed in the accumulation dtype and cast back."""
from __future__ import annotations

import torch


def reasons(op: str, device: torch.device) -> list[str]:
    """Why this backend cannot run `op` on `device` (empty: it can)."""
    return [] if device.type == "cpu" else ["serves CPU tensors only"]


def implementations() -> dict:
    """Nothing to run from Python: the C++ kernels are the CPU key's own."""
    return {}
