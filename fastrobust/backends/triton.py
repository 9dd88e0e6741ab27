"""The Triton backend: fastrobust/ops/<family>/triton.py. The CUDA key's kernel is C++
(csrc/launch/plans.cpp), which launches these kernels from plans it records through their Python
launchers once per call signature. CPU tensors run under TRITON_INTERPRET=1 (Triton's
interpreter, for tests) when this backend is forced with `fastrobust.backends.use("triton")`."""
from __future__ import annotations

import os

import torch

from ..ops import cuda_implementations, triton_implementations as implementations  # noqa: F401
from ..ops._triton import missing


def reasons(op: str, device: torch.device) -> list[str]:
    why = missing()
    out = [why] if why else []
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        out.append("CPU tensors need TRITON_INTERPRET=1 (the interpreter, for tests)")
    elif device.type not in ("cpu", "cuda"):
        out.append(f"no Triton support for {device.type} tensors")
    return out
