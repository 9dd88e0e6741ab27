"""Standard and robust accuracy over a data loader, with a progress bar.

Counts stay on the device until the end (no host sync per batch). Conditioning for models
that need it: ``branch=`` / ``mix=`` route every multi-branch BN, ``context=`` is a callable
``context(x) -> context manager`` entered around each batch's clean forward and each attack
(e.g. a FiLM condition for that batch), and extra keyword arguments go to ``model(x, ...)``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..nn import routing
from .attacks import FGSM, MIFGSM, PGD, Attack, eval_mode


def weighted_robust_accuracy(sa: float, ra: float) -> float:
    """AW-Net's weighted robust accuracy: 0.5·SA + 0.5·RA."""
    return 0.5 * sa + 0.5 * ra


def attack_suite(model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 pgd_steps: Iterable[int] = (20,), **kw) -> dict[str, Attack]:
    """The usual linf evaluation: FGSM, PGD-n for each n in ``pgd_steps``, MI-FGSM (10
    steps) and CW∞ (PGD-n on the margin loss, n the largest of ``pgd_steps``)."""
    steps = list(pgd_steps)
    suite: dict[str, Attack] = {"FGSM": FGSM(model, eps, **kw)}
    for n in steps:
        suite[f"PGD-{n}"] = PGD(model, eps, alpha, n, **kw)
    suite["MI-FGSM"] = MIFGSM(model, eps, alpha, 10, **kw)
    suite["CW-inf"] = PGD(model, eps, alpha, max(steps), loss="cw", **kw)
    return suite


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _batches(loader, device, desc, progress):
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, desc=desc, total=total, disable=not progress, leave=False):
        x, y = batch[0], batch[1]
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def evaluate(model: nn.Module, loader, attacks: Mapping[str, Attack] | None = None, *,
             branch=None, mix=None, context: Callable | None = None, device=None,
             progress: bool = True, desc: str = "evaluate", **forward_kwargs) -> dict:
    """Standard accuracy and robust accuracy under each attack, in one pass over ``loader``
    (batches of ``(x, y, ...)``). Returns ``{"SA": float, "RA": {name: float},
    "WRA": {name: float}, "n": int}`` (accuracies as fractions)."""
    attacks = dict(attacks or {})
    device = torch.device(device) if device is not None else _device_of(model)
    correct = torch.zeros(1 + len(attacks), dtype=torch.long, device=device)
    n = torch.zeros((), dtype=torch.long, device=device)
    with eval_mode(model):
        for x, y in _batches(loader, device, desc, progress):
            ctx = (lambda: context(x)) if context is not None else contextlib.nullcontext
            with torch.no_grad(), _routed(model, branch, mix), ctx():
                pred = model(x, **forward_kwargs).argmax(1)
            counts = [(pred == y).sum()]
            for atk in attacks.values():
                x_adv = atk(x, y, branch=branch, mix=mix, context=ctx(), **forward_kwargs)
                with torch.no_grad(), _routed(model, branch, mix), ctx():
                    counts.append((model(x_adv, **forward_kwargs).argmax(1) == y).sum())
            correct += torch.stack(counts)
            n += y.shape[0]
    total = max(int(n), 1)
    acc = (correct.double() / total).tolist()
    ra = dict(zip(attacks, acc[1:]))
    return {"SA": acc[0], "RA": ra,
            "WRA": {k: weighted_robust_accuracy(acc[0], v) for k, v in ra.items()},
            "n": int(n)}


def _routed(model, branch, mix):
    if branch is None and mix is None:
        return contextlib.nullcontext()
    return routing(model, branch=branch, mix=mix)


def accuracy(model: nn.Module, loader, **kw) -> float:
    """Standard (clean) accuracy over ``loader``; keywords as in :func:`evaluate`."""
    kw.setdefault("desc", "accuracy")
    return evaluate(model, loader, None, **kw)["SA"]


def robust_accuracy(model: nn.Module, loader, attack: Attack, **kw) -> float:
    """Accuracy on ``attack``'s adversarial examples over ``loader``; keywords as in
    :func:`evaluate`."""
    kw.setdefault("desc", f"robust accuracy ({type(attack).__name__})")
    return evaluate(model, loader, {"attack": attack}, **kw)["RA"]["attack"]


def batches_of(x: Tensor, y: Tensor, batch_size: int = 256):
    """A minimal loader over in-memory tensors: a list of (x, y) batches."""
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
