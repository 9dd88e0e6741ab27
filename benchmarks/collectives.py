"""Counting the synchronized BN's collectives, for benchmarks/ddp_sync_overhead.py and
tests/test_distributed.py (the tests put benchmarks/ on sys.path, tests/conftest.py)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AllReduceCounter(TorchDispatchMode):
    """Counts the all-reduces that run in its body: torch's functional collective
    (_c10d_functional.all_reduce_), which the synchronized BN's C++ autograd node calls
    through the dispatcher, seen here below autograd. ``n``: the count."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops._c10d_functional.all_reduce_.default:
            self.n += 1
        return func(*args, **(kwargs or {}))
