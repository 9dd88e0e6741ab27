"""relu(a + b) in plain PyTorch: what the forced eager backend runs."""
from __future__ import annotations

import torch


def add_relu(a, b):
    return torch.relu(a + b)
