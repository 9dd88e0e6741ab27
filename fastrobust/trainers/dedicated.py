"""Dedicated models: one plain network per λ, trained on OAT's loss at that fixed λ,
mean((1 − λ)·CE(x) + λ·CE(x_adv)) (λ = 0: standard training; λ = 1: PGD-AT), with an OAT
run's budget (epochs, batch, optimizer, schedule, attack). OAT's claim is that its one model
matches these at every λ of its set; `fastrobust demo` and the reproduction in
docs/reproductions.md put them beside it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import data as data_mod
from ..attacks import evaluate
from ..models import resnet18
from .oat import OATConfig, cosine_schedule, make_attack

__all__ = ["train_dedicated", "evaluate_dedicated"]


def _model(cfg: OATConfig, data) -> nn.Module:
    if cfg.arch == "resnet18":
        return resnet18(data.num_classes, cfg.width, data.in_channels)
    raise ValueError(f"arch: dedicated models are built for resnet18, got {cfg.arch!r}")


def train_dedicated(cfg: OATConfig, lam: float, data=None, progress: bool = True,
                    log=print) -> nn.Module:
    """A plain ResNet-18 of the run's width trained at the fixed ``lam`` with the run's
    epochs, batch size, SGD, cosine schedule and PGD (its seed offset by the λ, so two
    dedicated models never share a stream). Returns it in eval mode."""
    if not 0 <= lam <= 1:
        raise ValueError(f"lam: must be in [0, 1], got {lam}")
    data = data_mod.load(cfg.dataset, cfg.data_root) if data is None else data
    device = torch.device(cfg.device)
    seed = cfg.seed + 1000 + round(1000 * lam)
    torch.manual_seed(seed)
    model = _model(cfg, data).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = cosine_schedule(opt, cfg.epochs)
    gen = torch.Generator().manual_seed(seed)
    atk = make_attack(model, cfg, generator=torch.Generator(device).manual_seed(seed + 1))
    for epoch in range(cfg.epochs):
        model.train()
        batches = data_mod.Batches(data.train, cfg.batch_size, shuffle=True, generator=gen)
        n = len(batches) if not cfg.max_train_batches else min(len(batches),
                                                                cfg.max_train_batches)
        total = 0.0
        for i, (x, y) in enumerate(tqdm(batches, total=n, leave=False, disable=not progress,
                                        desc=f"dedicated λ={lam:g}, epoch {epoch + 1}")):
            if i == n:
                break
            x, y = x.to(device), y.to(device)
            loss = torch.zeros((), device=device)
            if lam < 1:
                loss = loss + (1 - lam) * F.cross_entropy(model(x), y)
            if lam > 0:
                loss = loss + lam * F.cross_entropy(model(atk(x, y)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        sched.step()
        if log is not None:
            log(f"dedicated λ={lam:g}  epoch {epoch + 1:>3}/{cfg.epochs}  loss "
                f"{total / max(n, 1):.4f}")
    return model.eval()


def evaluate_dedicated(model: nn.Module, split, cfg: OATConfig, lam: float,
                       batch_size: int = 256) -> dict:
    """SA and RA (PGD-``eval_steps``, the sweep's attack) of a dedicated model, as a row of
    the λ table."""
    device = next(model.parameters()).device
    steps = cfg.eval_steps
    atk = make_attack(model, cfg, steps, torch.Generator(device).manual_seed(0))
    r = evaluate(model, data_mod.Batches(split, batch_size), {f"PGD-{steps}": atk},
                 progress=False)
    return {"lambda": lam, "seen": True, "SA": r["SA"], "RA": r["RA"][f"PGD-{steps}"]}
