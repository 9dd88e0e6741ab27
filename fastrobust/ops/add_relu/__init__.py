"""relu(a + b), the residual join: its entry point and eager kernel here, its Triton kernel in
triton.py; its schema, check, CPU kernel, composite and autograd node in
csrc/add_relu/add_relu.cpp. What fastrobust.ops registers for it is declared here."""
from __future__ import annotations

import torch
from torch import Tensor

_add_relu = torch.ops.fastrobust.add_relu.default


def add_relu(a: Tensor, b: Tensor) -> Tensor:
    """relu(a + b): the fused op for equal shapes, dtypes and devices outside torch.compile
    (which fuses the pair itself); the two plain ops otherwise."""
    if (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and not torch.compiler.is_compiling()):
        return _add_relu(a, b)
    return torch.relu(a + b)


def eager_add_relu(a: Tensor, b: Tensor) -> Tensor:
    """The op in plain PyTorch: what the forced eager backend runs."""
    return torch.relu(a + b)


KEY = "add_relu"
OPS = ("add_relu",)
FAKES: dict = {}  # (its fake is C++: the composite)
EAGER = {"add_relu": eager_add_relu}
TRITON = {"add_relu": "triton"}
CPP_COMPOSITE = ("add_relu",)  # no eager composite registered over the C++ one
