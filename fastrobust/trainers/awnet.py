"""The AW-Net trainer: MTARD-style two-teacher distillation of the dynamic-weight network with
MixBN, plus the adversarial detector's type loss.

Each step: the student is attacked in eval mode (PGD-10, ε the data set's: 8/255 on CIFAR-10
and SVHN, 0.2 on the digits; α = ε/4; soft MixBN from the detector, as at test time), then
one training forward over [x; x_adv] with MixBN routed by the known type, and

    L = CE(type head, clean/adv) + α_adv·τ²·KL(T_adv(x_adv) ‖ S(x_adv))
                                 + α_nat·τ²·KL(T_nat(x) ‖ S(x))

(temperature τ on both sides). α_adv, α_nat follow MTARD's normalized loss balance: each
term's weight tracks its loss relative to its first value (the one lagging behind gets more),
smoothed, summing to 2 — tensors on the device, no host read per step.

Teachers: any `nn.Module` checkpoints (``teacher_nat``, ``teacher_adv``: a module saved with
torch.save, or a fastrobust checkpoint holding one), or, when not given, a standard and a
PGD-AT ResNet-18 that the trainer trains first (saved beside the run). The detector's frozen
feature extractor is the natural teacher's backbone (which must then be a fastrobust ResNet).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import data as data_mod
from ..attacks import FGSM, PGD, weighted_robust_accuracy
from ..models import ResNet, ResNetFeatures, awnet_resnet18, resnet18
from .base import BaseTrainer, check_finite
from .checkpoints import CheckpointError, load_checkpoint, require_entries, save_checkpoint
from .config import ATTACK_EPS, BaseConfig, ConfigError, check_number
from .results import format_table, pyplot, save_figure, write_json

__all__ = ["AWNetConfig", "AWNetTrainer", "LossBalance", "awnet_loss", "train_teacher",
           "evaluate_awnet", "report_awnet"]


@dataclass
class AWNetConfig(BaseConfig):
    """Everything an AW-Net run needs (the shared fields in `BaseConfig`)."""
    DATASET_DEFAULTS: ClassVar[dict] = {"eps": ATTACK_EPS}
    epochs: int = 100
    teacher_epochs: int = 20        # for the teachers the trainer trains itself
    eps: float | None = None        # None: the data set's (0.2 on digits, 8/255 on CIFAR, SVHN)
    alpha: float | None = None      # None: eps / 4 (the paper's 2/255 at 8/255)
    steps: int = 10
    tau: float = 1.0
    beta: float = 4.0
    mix_bn: bool = True             # False: one BN, not MixBN (the paper's Table 3 ablation)
    balance_rate: float = 0.1       # smoothing of MTARD's loss balance
    teacher_nat: str | None = None  # paths of nn.Module checkpoints; None: trained here
    teacher_adv: str | None = None
    out: str = "runs/awnet"

    def validate(self) -> None:
        super().validate()
        check_number(self, "teacher_epochs", 0, integer=True)
        check_number(self, "eps", 0, 1)
        if self.alpha is None:
            self.alpha = self.eps / 4
        check_number(self, "alpha", 0, 1)
        if not isinstance(self.mix_bn, bool):
            raise ConfigError("mix_bn", f"must be True or False, got {self.mix_bn!r}")
        check_number(self, "tau", 0, lo_open=True)
        check_number(self, "beta", 0, lo_open=True)
        check_number(self, "balance_rate", 0, 1, lo_open=True)
        for name in ("teacher_nat", "teacher_adv"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(name, f"must be a saved nn.Module file, got {path!r} "
                                  "(no such file)")


class LossBalance(nn.Module):
    """MTARD's normalized loss balance as device tensors: r = L / L_first for each term,
    target α_adv = 2·r_adv / (r_adv + r_nat), α ← (1 − rate)·α + rate·target, α_nat = 2 − α_adv.
    Buffers, so a checkpoint keeps them."""

    def __init__(self, rate: float = 0.1):
        super().__init__()
        self.rate = float(rate)
        self.register_buffer("first", torch.zeros(2))     # (L_adv, L_nat) of the first step
        self.register_buffer("alpha_adv", torch.ones(()))

    @torch.no_grad()
    def update(self, l_adv: Tensor, l_nat: Tensor, reduce=None) -> tuple[Tensor, Tensor]:
        """``reduce``: makes the two losses the global batch's (under DDP, a mean over the
        ranks), so every rank keeps the same weights."""
        cur = torch.stack([l_adv.detach(), l_nat.detach()]).to(self.first)
        if reduce is not None:
            cur = reduce(cur)
        fresh = (self.first == 0).all()
        self.first.copy_(torch.where(fresh, cur, self.first))
        r = cur / self.first.clamp_min(1e-12)
        target = 2 * r[0] / (r[0] + r[1]).clamp_min(1e-12)
        self.alpha_adv.copy_(torch.where(fresh, self.alpha_adv,
                                         (1 - self.rate) * self.alpha_adv + self.rate * target))
        return self.alpha_adv.clone(), 2 - self.alpha_adv


def _kd(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)), batch mean."""
    return tau * tau * F.kl_div(F.log_softmax(student / tau, 1), F.softmax(teacher / tau, 1),
                                reduction="batchmean")


def awnet_loss(model, teacher_nat: nn.Module, teacher_adv: nn.Module, x: Tensor, y: Tensor,
               attack: PGD, balance: LossBalance, tau: float = 1.0, forward=None,
               reduce=None) -> Tensor:
    """One AW-Net batch (model in train mode): the attack in eval mode on the whole model,
    one training forward over [x; x_adv] routed by type, type loss + balanced distillation.
    ``forward``: what the training forward calls (the DDP wrapper under DDP); ``reduce``: see
    `LossBalance.update`."""
    forward = model if forward is None else forward
    n = x.shape[0]
    x_adv = attack(x, y)
    types = torch.cat([torch.full((n,), 0, device=x.device), torch.full((n,), 1,
                                                                       device=x.device)])
    inp = torch.cat([x, x_adv])
    logits, type_logits = forward(inp, is_adv=types, return_type=True)
    with torch.no_grad():
        t_nat, t_adv = teacher_nat(x), teacher_adv(x_adv)
    l_nat = _kd(logits[:n], t_nat, tau)
    l_adv = _kd(logits[n:], t_adv, tau)
    a_adv, a_nat = balance.update(l_adv, l_nat, reduce)
    return F.cross_entropy(type_logits, types) + a_adv * l_adv + a_nat * l_nat


def train_teacher(data, cfg: AWNetConfig, adversarial: bool, device, progress: bool = True,
                  log=print) -> ResNet:
    """A standard (or PGD-AT) ResNet-18 of the run's width: SGD, cosine, ``teacher_epochs``."""
    torch.manual_seed(cfg.seed + (2 if adversarial else 1))
    model = resnet18(data.num_classes, cfg.width, data.in_channels).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.teacher_epochs, 1))
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    atk = PGD(model, cfg.eps, cfg.alpha, cfg.steps,
              generator=torch.Generator(device).manual_seed(cfg.seed + 8))
    name = "PGD-AT" if adversarial else "standard"
    for e in range(cfg.teacher_epochs):
        model.train()
        batches = data_mod.Batches(data.train, cfg.batch_size, shuffle=True, generator=gen)
        n = len(batches) if not cfg.max_train_batches else min(len(batches),
                                                                cfg.max_train_batches)
        total = torch.zeros((), device=device)
        for i, (x, y) in enumerate(tqdm(batches, total=n, leave=False, disable=not progress,
                                        desc=f"{name} teacher, epoch {e + 1}")):
            if i == n:
                break
            x, y = x.to(device), y.to(device)
            if adversarial:
                x = atk(x, y)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        sched.step()
        log(f"{name} teacher  epoch {e + 1:>3}/{cfg.teacher_epochs}  loss "
            f"{float(total) / max(n, 1):.4f}")
    return model.eval()


def step_schedule(opt, epochs: int):
    """The paper's lr steps (×0.1 at epochs 215, 260, 285 of 300) scaled to the run's length."""
    E = max(epochs, 1)
    return torch.optim.lr_scheduler.MultiStepLR(
        opt, [math.ceil(f * E) for f in (215 / 300, 260 / 300, 285 / 300)], 0.1)


def _load_module(path: str, device) -> nn.Module:
    try:
        obj = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any reader failure means a damaged file
        raise CheckpointError(f"{path} is not a readable saved module "
                              f"({type(e).__name__}: {str(e).strip()[:160]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("module"), nn.Module):
        obj = obj["module"]
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{path}: expected an nn.Module saved with torch.save (or a dict with "
                        f"its 'module'), got {type(obj).__name__}")
    return obj.to(device).eval()


class AWNetTrainer(BaseTrainer):
    """Teachers (loaded or trained), then the AW-Net epochs with an atomic checkpoint
    (``<out>/last.pt``) after each; ``resume=True`` continues from it.

    Data-parallel under ``torchrun`` as the other trainers (each rank its slice of the global
    batch, MixBN synchronized with ``sync_bn``, DDP for the training forward, the attack on the
    model itself, MTARD's balance from the global losses; rank 0 logs and checkpoints).
    Teachers the trainer trains itself are trained on every rank alike, from the same seed."""

    def __init__(self, cfg: AWNetConfig, resume: bool = False, progress: bool = True,
                 log=print, distributed: bool | None = None):
        self._setup(cfg, progress, distributed)
        say = log if self.is_main else (lambda *a, **k: None)
        self.teacher_nat = self._teacher(cfg.teacher_nat, "teacher_nat.pt", False, resume, say)
        self.teacher_adv = self._teacher(cfg.teacher_adv, "teacher_adv.pt", True, resume, say)
        if not isinstance(self.teacher_nat, ResNet):
            raise TypeError("the detector's feature extractor is the natural teacher's "
                            "backbone, so that teacher must be a fastrobust.models.ResNet; got "
                            f"{type(self.teacher_nat).__name__}")
        for t in (self.teacher_nat, self.teacher_adv):
            for p in t.parameters():
                p.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        extractor = ResNetFeatures(copy.deepcopy(self.teacher_nat))
        self.model = self._place(awnet_resnet18(extractor, extractor.dim,
                                                self.data.num_classes, cfg.width,
                                                self.data.in_channels, cfg.beta,
                                                mix_bn=cfg.mix_bn),
                                 cfg.memory_format, cfg.sync_bn)
        self.forward = self._wrap(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        self.sched = step_schedule(self.opt, cfg.epochs)
        self.balance = LossBalance(cfg.balance_rate).to(self.device)
        self.attack = PGD(self.model, cfg.eps, cfg.alpha, cfg.steps, generator=self.attack_gen,
                          random_start=cfg.random_start)
        self.epoch = 0
        self._start(resume)

    def _teacher(self, path, name, adversarial, resume, log):
        if path:
            return _load_module(path, self.device)
        own = os.path.join(self.cfg.out, name)
        if resume and os.path.exists(own):
            return _load_module(own, self.device)
        model = train_teacher(self.data, self.cfg, adversarial, self.device, self.progress, log)
        if self.is_main:
            save_checkpoint(own, {"module": model})
        return model

    def state(self) -> dict:
        return {"kind": "awnet", "config": dataclasses.asdict(self.cfg),
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "balance": self.balance.state_dict(),
                "epoch": self.epoch, "history": self.history, "resumes": self.resumes,
                "rng": self._rng_state()}

    def load(self, path: str) -> None:
        ck = load_checkpoint(path, kind="awnet")
        require_entries(ck, path, "model", "optimizer", "scheduler", "balance", "epoch",
                        "history", "rng.data", "rng.attack_per_rank")
        self._load_weights(path, ck)
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.balance.load_state_dict(ck["balance"])
        self._restore(ck)
        self.epoch = ck["epoch"]
        self._apply_resume(ck["config"], [("epochs", "lr", "opt", "sched", self.epoch,
                                            step_schedule)])

    def _mean_over_ranks(self, t: Tensor) -> Tensor:
        return self._all_sum(t.clone()) / self.world

    def step(self, x: Tensor, y: Tensor, n_global: int | None = None) -> Tensor:
        """One step on this rank's part of a global batch; returns this rank's share of the
        batch's loss (the loss itself in one process)."""
        weight = len(y) * self.world / (len(y) if n_global is None else n_global)
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = awnet_loss(self.model, self.teacher_nat, self.teacher_adv, x, y,
                              self.attack, self.balance, self.cfg.tau, self.forward,
                              self._mean_over_ranks if self.world > 1 else None).float() * weight
        loss.backward()
        self.opt.step()
        return loss.detach() / self.world

    def next_epoch(self) -> dict | None:
        cfg = self.cfg
        if self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            losses, _ = self._train_batches(f"AW-Net epoch {self.epoch + 1}/{cfg.epochs}",
                                            f"at epoch {self.epoch + 1}",
                                            lambda x, y, _, n: self.step(x, y, n))
            mean = float(losses.mean())
            check_finite(mean, f"in epoch {self.epoch + 1}", self.checkpoint)
            self.sched.step()
            self.epoch += 1
            return {"epoch": self.epoch, "loss": mean,
                    "alpha_adv": float(self.balance.alpha_adv),
                    "seconds": time.perf_counter() - t0}
        return None

    def epoch_line(self, rec: dict) -> tuple[str, str]:
        return (f"after epoch {rec['epoch']}",
                f"AW-Net epoch {rec['epoch']:>3}/{self.cfg.epochs}  loss {rec['loss']:.4f}  "
                f"α_adv {rec['alpha_adv']:.3f}  {rec['seconds']:.1f}s")




@torch.no_grad()
def _acc(model, x, y):
    return int((model(x).argmax(1) == y).sum())


def evaluate_awnet(model, split, cfg: AWNetConfig, batch_size: int = 256,
                   progress: bool = True, steps: int | None = None, baselines=None) -> dict:
    """SA and RA under FGSM, PGD-n and CW∞ (ε = cfg.eps), the weighted robust accuracy
    0.5·SA + 0.5·RA(PGD-n), and the detector's accuracy on clean against PGD-n inputs; the
    same SA/RA for every model of ``baselines`` ({name: module}) for comparison."""
    steps = cfg.eval_steps if steps is None else steps
    dev = next(model.parameters()).device
    models = {"AW-Net": model, **(baselines or {})}
    out = {}
    for name, m in models.items():
        m.eval()
        gen = torch.Generator(dev).manual_seed(0)
        attacks = {"FGSM": FGSM(m, cfg.eps), f"PGD-{steps}": PGD(m, cfg.eps, cfg.alpha, steps,
                                                                   generator=gen),
                   "CW-inf": PGD(m, cfg.eps, cfg.alpha, steps, loss="cw", generator=gen)}
        counts = {"SA": 0, **{k: 0 for k in attacks}}
        det, n = 0, 0
        for x, y in tqdm(data_mod.Batches(split, batch_size), disable=not progress,
                         leave=False, desc=f"evaluating {name}"):
            x, y = x.to(dev), y.to(dev)
            counts["SA"] += _acc(m, x, y)
            for k, atk in attacks.items():
                xa = atk(x, y)
                counts[k] += _acc(m, xa, y)
                if name == "AW-Net" and k.startswith("PGD"):
                    with torch.no_grad():
                        tc = m(x, return_type=True)[1].argmax(1)
                        ta = m(xa, return_type=True)[1].argmax(1)
                    det += int((tc == 0).sum()) + int((ta == 1).sum())
            n += len(y)
        row = {k: v / n for k, v in counts.items()}
        row["W-robust"] = weighted_robust_accuracy(row["SA"], row[f"PGD-{steps}"])
        if name == "AW-Net":
            row["detector"] = det / (2 * n)
        out[name] = row
    return out


def report_awnet(result: dict, cfg: AWNetConfig, out: str, title: str) -> None:
    """Table on the terminal, results.json and a bar plot of the accuracies."""
    keys = [k for k in next(iter(result.values())) if k != "detector"]
    rows = [{"model": name, **{k: 100 * r[k] for k in keys},
             "detector": 100 * r["detector"] if "detector" in r else None}
            for name, r in result.items()]
    print(format_table(rows, [("model", "model", "{}")] + [(k, f"{k} %", "{:.1f}") for k in keys]
                       + [("detector", "detector %", "{:.1f}")]))
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "results.json"), {"title": title, "results": result,
                                                   "config": dataclasses.asdict(cfg)})
    fig, ax = pyplot().subplots(figsize=(7, 3.6))
    width = 0.8 / len(result)
    for i, (name, r) in enumerate(result.items()):
        ax.bar([j + i * width for j in range(len(keys))], [100 * r[k] for k in keys], width,
               label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
    ax.set(ylabel="accuracy %", title=title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "accuracy.png"))
    print(f"results: {os.path.join(out, 'results.json')}; plot: "
          f"{os.path.join(out, 'accuracy.png')}")
