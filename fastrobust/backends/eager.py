"""The eager backend: the ops in plain PyTorch (fastrobust._engine over torch "leaves", and the
PGD steps in torch ops). Registered for CompositeExplicitAutograd, so it serves every device
that has no kernel of its own (MPS, XPU, CUDA without Triton, ...), and any device when forced.
"""
from __future__ import annotations

import torch

from ._schema import checked as _checked, implementations as _implementations

NAME = "eager"
SERVES = ("cpu", "cuda")


def reasons(op: str, device: torch.device) -> list[str]:
    return []


def _bn():
    from .._engine import eager
    return eager


def _pgd():
    from .._engine import pgd_eager
    return pgd_eager


def implementations() -> dict:
    from .. import _sync_eager
    impls = _implementations(_bn, _pgd)
    impls.update(_checked(_sync_eager.implementations()))
    return impls
