"""FiLM's Python side of its schema (csrc/film/ops.cpp: film, film_backward): the fakes."""
from __future__ import annotations

import torch

from .._common import acc_dtype


def _fake_film(x, gamma, beta):
    return torch.empty_like(x)


def _fake_film_backward(dy, x, gamma, needs, per_channel):
    acc = acc_dtype(x)
    N, C = x.shape[:2]
    shape = [(C,) if pc else (N, C) for pc in per_channel]
    return (torch.empty_like(x) if needs[0] else x.new_empty(0),
            x.new_empty(shape[0] if needs[1] else (0,), dtype=acc),
            x.new_empty(shape[1] if needs[2] else (0,), dtype=acc))


FAKES = {"film": _fake_film, "film_backward": _fake_film_backward}
