"""The AFA trainer (Adaptive Feature Alignment): stage I trains a K-way BN network, one BN
branch per attack strength ε_k (evenly spaced from 0 to ``max_eps``; branch 0 is clean); stage II
freezes it and trains the weight generator whose per-sample W0 mixes BN_0 and BN_{K-1}.

Stage I, batched (default): the K−1 adversarial copies of a batch are made by ONE attack with
per-sample ε (sample n of copy k at ε_k, through branch k), then ONE forward/backward over the
clean batch and all copies, each routed to its strength's branch:
    L = CE(f(x; BN_0), y) + Σ_k L_adv,k      (PGD-AT: L_adv,k = CE(f(x_k; BN_k), y);
                                              TRADES: β·KL(f(x; BN_0) ‖ f(x_k; BN_k)))
The per-branch batch statistics are those of the paper's sequential schedule (Algorithm 1: one
attack and one forward per strength), kept as ``schedule="sequential"``; both give the same loss.

Stage II: inputs attacked at a random strength per sample (unknown to the model: ε ~ U(0,
max_eps), clean with probability 1/K), cross-entropy only, the generator's parameters only; the
base model stays in eval mode (its statistics frozen).
"""
from __future__ import annotations

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
from ..attacks import FGSM, PGD
from ..attacks.attacks import eval_mode
from ..models import afa_resnet18
from .base import BaseTrainer, check_finite
from .checkpoints import CheckpointError, load_checkpoint, require_entries
from .config import ATTACK_EPS, BaseConfig, ConfigError, check_number
from .results import format_table, pyplot, save_figure, write_json

__all__ = ["AFAConfig", "AFATrainer", "RelativePGD", "stage1_loss", "evaluate_afa",
           "report_afa"]


@dataclass
class AFAConfig(BaseConfig):
    """Everything an AFA run needs (the shared fields in `BaseConfig`)."""
    DATASET_DEFAULTS: ClassVar[dict] = {
        "max_eps": ATTACK_EPS,
        # the paper's: 0.1 and 0.01 on CIFAR-10, 0.01 and 0.001 on SVHN; on the digits a
        # short stage II at 0.01 learns a constant W1 (docs/trainers.md), at 0.1 a rising one
        "lr": {"digits": 0.1, "cifar10": 0.1, "svhn": 0.01},
        "lr2": {"digits": 0.1, "cifar10": 0.01, "svhn": 0.001}}
    epochs: int = 100               # stage I
    epochs2: int = 20               # stage II
    lr: float | None = None         # stage I (None: the data set's, DATASET_DEFAULTS)
    lr2: float | None = None        # stage II
    num_branches: int = 5           # K strengths, evenly spaced in [0, max_eps]
    max_eps: float | None = None    # None: the data set's (0.2 on digits, 8/255 on CIFAR, SVHN)
    alpha_ratio: float = 0.25       # PGD step = ratio·ε (2/255 at 8/255)
    adv_loss: str = "pgd"           # pgd (PGD-AT) | trades
    trades_beta: float = 6.0
    schedule: str = "batched"       # batched (one attack, one pass) | sequential (Alg. 1)
    wg_hidden: int = 32
    out: str = "runs/afa"
    eval_fracs: tuple = (0.0, 0.125, 0.25, 0.5, 1.0)   # ε / max_eps: the paper's {0, 1, 2, 4,
                                                        # 8}/255 at 8/255, .025-.2 on digits

    def validate(self) -> None:
        super().validate()
        check_number(self, "num_branches", 2, integer=True)
        if self.adv_loss not in ("pgd", "trades"):
            raise ConfigError("adv_loss", f"must be 'pgd' or 'trades', got {self.adv_loss!r}")
        if self.schedule not in ("batched", "sequential"):
            raise ConfigError("schedule", f"must be 'batched' or 'sequential', got "
                              f"{self.schedule!r}")
        check_number(self, "epochs2", 0, integer=True)
        check_number(self, "lr2", 0, lo_open=True)
        check_number(self, "max_eps", 0, 1, lo_open=True)
        check_number(self, "alpha_ratio", 0, lo_open=True)
        check_number(self, "trades_beta", 0)
        check_number(self, "wg_hidden", 1, integer=True)

    def strengths(self, device=None) -> Tensor:
        """ε_k, k = 0..K−1 (ε_0 = 0: the clean branch)."""
        return torch.linspace(0, self.max_eps, self.num_branches, device=device)


def stage1_schedule(opt, epochs: int):
    """Stage I: lr ×0.1 at 75 % and 90 % of the epochs."""
    E = max(epochs, 1)
    return torch.optim.lr_scheduler.MultiStepLR(opt, [math.ceil(0.75 * E), math.ceil(0.9 * E)],
                                                0.1)


def stage2_schedule(opt, epochs: int):
    """Stage II: lr ×0.1 at half the epochs."""
    return torch.optim.lr_scheduler.MultiStepLR(opt, [math.ceil(0.5 * max(epochs, 1))], 0.1)


class RelativePGD(PGD):
    """linf PGD whose step is ``ratio``·ε, per sample when ε is (so one attack serves a batch
    of mixed strengths)."""

    def __init__(self, model: nn.Module, eps, ratio: float = 0.25, steps: int = 7, **kw):
        super().__init__(model, eps=eps, alpha=None, steps=steps, **kw)
        self.ratio = float(ratio)

    def _step_size(self, eps):
        return eps * self.ratio


def _trades_kl(logits_adv: Tensor, p_clean: Tensor) -> Tensor:
    """Σ_n KL(p_clean,n ‖ softmax(logits_adv,n)) (summed over the batch)."""
    return F.kl_div(F.log_softmax(logits_adv, 1), p_clean, reduction="sum")


def stage1_loss(model, x: Tensor, y: Tensor, cfg: AFAConfig,
                generator: torch.Generator | None = None, schedule: str | None = None,
                memory_format=torch.contiguous_format, forward: nn.Module | None = None
                ) -> Tensor:
    """Stage I's loss of one batch (model in train mode, stage 1): CE on the clean batch
    through BN_0 plus, for every strength k ≥ 1, the adversarial loss of the batch attacked at
    ε_k through BN_k. ``schedule``: "batched" (one attack, one forward) or "sequential".
    ``forward``: what the training forwards call (the DDP wrapper under DDP); the attacks run
    on ``model`` itself."""
    schedule = schedule or cfg.schedule
    forward = model if forward is None else forward
    K, N, dev = cfg.num_branches, x.shape[0], x.device
    eps = cfg.strengths(dev)
    trades = cfg.adv_loss == "trades"

    def attack(e, b, inputs, targets, p_clean=None):
        loss = "ce" if p_clean is None else (lambda out, _y: _trades_kl(out, p_clean))
        atk = RelativePGD(model, e, cfg.alpha_ratio, cfg.steps, random_start=cfg.random_start,
                          loss=loss, generator=generator)
        return atk(inputs, targets, branch=b)

    p_clean = None
    if trades:  # the attack's target distribution: the clean prediction (eval mode)
        with torch.no_grad(), eval_mode(model):
            p_clean = F.softmax(model(x, branch=0), 1)

    if schedule == "batched":
        br = torch.arange(1, K, device=dev).repeat_interleave(N)
        e = eps[1:].repeat_interleave(N)
        xs = torch.cat([x] * (K - 1)).contiguous(memory_format=memory_format)
        ys = y.repeat(K - 1)
        x_adv = attack(e, br, xs, ys, None if p_clean is None else p_clean.repeat(K - 1, 1))
        inp = torch.cat([x, x_adv]).contiguous(memory_format=memory_format)
        logits = forward(inp, branch=torch.cat([torch.zeros_like(y), br]))
        clean, adv = logits[:N], logits[N:]
        lc = F.cross_entropy(clean, y)
        if trades:
            la = cfg.trades_beta * _trades_kl(adv, F.softmax(clean, 1).repeat(K - 1, 1)) / N
        else:
            la = F.cross_entropy(adv, ys, reduction="sum") / N
        return lc + la
    if schedule != "sequential":
        raise ValueError(f"schedule must be 'batched' or 'sequential', got {schedule!r}")
    total = torch.zeros((), device=dev)
    advs = []
    for k in range(1, K):  # Algorithm 1: strength k's attack and forward, through BN_k
        x_adv = attack(float(eps[k]), k, x, y, p_clean)
        advs.append(forward(x_adv, branch=k))
    clean = forward(x, branch=0)
    for logits_k in advs:
        if trades:
            total = total + cfg.trades_beta * _trades_kl(logits_k, F.softmax(clean, 1)) / N
        else:
            total = total + F.cross_entropy(logits_k, y)
    return F.cross_entropy(clean, y) + total


def random_strengths(n: int, cfg: AFAConfig, generator: torch.Generator) -> Tensor:
    """Stage II's per-sample strengths: U(0, max_eps), and exactly 0 (clean) with probability
    1/K (host tensor)."""
    e = torch.rand(n, generator=generator) * cfg.max_eps
    clean = torch.rand(n, generator=generator) < 1 / cfg.num_branches
    return torch.where(clean, torch.zeros_like(e), e)


class AFATrainer(BaseTrainer):
    """Stage I then stage II, an atomic checkpoint (``<out>/last.pt``) after every epoch of
    either; ``resume=True`` continues from it, in the stage it was in.

    Data-parallel under ``torchrun`` as the OAT trainer is (``batch_size`` is the global batch,
    each rank its slice; stage II's random strengths drawn for the global batch; the K-way
    BNs and the generator's BNs synchronized with ``sync_bn``; DDP over the base network in
    stage I and over the generator in stage II; rank 0 logs, checkpoints and evaluates)."""

    def __init__(self, cfg: AFAConfig, resume: bool = False, progress: bool = True,
                 distributed: bool | None = None):
        self._setup(cfg, progress, distributed)
        torch.manual_seed(cfg.seed)
        self.model = self._place(afa_resnet18(self.data.num_classes, cfg.width,
                                              self.data.in_channels, cfg.num_branches,
                                              cfg.wg_hidden), cfg.memory_format, cfg.sync_bn)
        self.forward1 = self.forward2 = self.model
        if self.world > 1:
            gen = list(self.model.generator.parameters())
            for p in gen:  # stage I's DDP covers the base network (the generator is unused)
                p.requires_grad_(False)
            self.forward1 = self._ddp(self.model, cfg.sync_bn)
            for p in gen:
                p.requires_grad_(True)
        base = [p for n, p in self.model.named_parameters() if not n.startswith("generator.")]
        self.opt1 = torch.optim.SGD(base, lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        self.sched1 = stage1_schedule(self.opt1, cfg.epochs)
        self.opt2 = torch.optim.SGD(self.model.generator.parameters(), lr=cfg.lr2,
                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.sched2 = stage2_schedule(self.opt2, cfg.epochs2)
        self.epoch1 = self.epoch2 = 0
        self._start(resume)

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {"kind": "afa", "config": dataclasses.asdict(self.cfg),
                "model": self.model.state_dict(), "stage": self.model.stage,
                "opt1": self.opt1.state_dict(), "opt2": self.opt2.state_dict(),
                "sched1": self.sched1.state_dict(), "sched2": self.sched2.state_dict(),
                "epoch1": self.epoch1, "epoch2": self.epoch2, "history": self.history,
                "resumes": self.resumes, "rng": self._rng_state()}

    def load(self, path: str) -> None:
        ck = load_checkpoint(path, kind="afa")
        require_entries(ck, path, "model", "stage", "opt1", "opt2", "sched1", "sched2",
                        "epoch1", "epoch2", "history", "rng.data", "rng.attack_per_rank",
                        "config.epochs")
        if ck["stage"] == 2:
            if self.cfg.epochs != ck["config"]["epochs"]:
                raise CheckpointError(f"{path}: stage II has begun, so --epochs (stage I) can "
                                      f"no longer change ({ck['config']['epochs']} in the run)")
            self.model.freeze_for_stage2()
        self._load_weights(path, ck)
        self.opt1.load_state_dict(ck["opt1"])
        self.opt2.load_state_dict(ck["opt2"])
        self.sched1.load_state_dict(ck["sched1"])
        self.sched2.load_state_dict(ck["sched2"])
        self._restore(ck)
        self.epoch1, self.epoch2 = ck["epoch1"], ck["epoch2"]
        self._apply_resume(ck["config"], [
            ("epochs", "lr", "opt1", "sched1", self.epoch1, stage1_schedule),
            ("epochs2", "lr2", "opt2", "sched2", self.epoch2, stage2_schedule)])

    # -- training ----------------------------------------------------------------------------
    def _enter_stage2(self) -> None:
        if self.model.stage == 1:
            self.model.freeze_for_stage2()
        if self.world > 1 and self.forward2 is self.model:  # DDP over the generator only
            self.forward2 = self._ddp(self.model, self.cfg.sync_bn)

    def step1(self, x: Tensor, y: Tensor, n_global: int | None = None) -> Tensor:
        """One stage-I step on this rank's part of a global batch of ``n_global`` samples;
        returns this rank's share of the batch's loss (the loss itself in one process)."""
        weight = len(y) * self.world / (len(y) if n_global is None else n_global)
        self.opt1.zero_grad(set_to_none=True)
        with self.autocast():
            loss = stage1_loss(self.model, x, y, self.cfg, self.attack_gen,
                               memory_format=self.memory_format,
                               forward=self.forward1).float() * weight
        loss.backward()
        self.opt1.step()
        return loss.detach() / self.world

    def step2(self, x: Tensor, y: Tensor, eps: Tensor | None = None,
              n_global: int | None = None) -> Tensor:
        """One stage-II step; ``eps``: per-sample strengths (drawn here when None)."""
        weight = len(y) * self.world / (len(y) if n_global is None else n_global)
        if eps is None:
            eps = random_strengths(len(y), self.cfg, self.gen)
        with self.autocast():
            x_adv = RelativePGD(self.model, eps.to(self.device), self.cfg.alpha_ratio,
                                self.cfg.steps, random_start=self.cfg.random_start,
                                generator=self.attack_gen)(x, y)
            self.opt2.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.forward2(x_adv).float(), y) * weight
        loss.backward()
        self.opt2.step()
        return loss.detach() / self.world

    def _epoch(self, stage: int) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        num = self.epoch1 + 1 if stage == 1 else self.epoch2 + 1
        total = cfg.epochs if stage == 1 else cfg.epochs2
        if stage == 1:
            step, draw = (lambda x, y, _, n: self.step1(x, y, n)), None
        else:  # the strengths drawn for the global batch
            step, draw = self.step2, (lambda n: random_strengths(n, cfg, self.gen))
        losses, _ = self._train_batches(f"stage {stage}, epoch {num}/{total}",
                                        f"in stage {stage}, epoch {num}", step, draw)
        mean = float(losses.mean()) if len(losses) else float("nan")
        check_finite(mean, f"in stage {stage}, epoch {num}", self.checkpoint)
        (self.sched1 if stage == 1 else self.sched2).step()
        return {"stage": stage, "epoch": num, "loss": mean, "losses": losses.tolist(),
                "seconds": time.perf_counter() - t0}

    def next_epoch(self) -> dict | None:
        if self.epoch1 < self.cfg.epochs:
            rec = self._epoch(1)
            self.epoch1 += 1
            return rec
        self._enter_stage2()  # idempotent: a run resumed in stage II is in it already
        if self.epoch2 < self.cfg.epochs2:
            rec = self._epoch(2)
            self.epoch2 += 1
            return rec
        return None

    def epoch_line(self, rec: dict) -> tuple[str, str]:
        total = self.cfg.epochs if rec["stage"] == 1 else self.cfg.epochs2
        return (f"after stage {rec['stage']}, epoch {rec['epoch']}",
                f"stage {rec['stage']}  epoch {rec['epoch']:>3}/{total}  "
                f"loss {rec['loss']:.4f}  {rec['seconds']:.1f}s")


# -- evaluation --------------------------------------------------------------------------------

def _rank(t: Tensor) -> Tensor:
    r = torch.empty_like(t)
    r[t.argsort()] = torch.arange(len(t), dtype=t.dtype, device=t.device)
    return r


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties broken by position)."""
    ra, rb = _rank(a.double()), _rank(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


@torch.no_grad()
def _predict(model, x):
    logits, w0 = model(x, return_weight=True)
    return logits.argmax(1), w0


def evaluate_afa(model, split, cfg: AFAConfig, batch_size: int = 256, progress: bool = True,
                 steps: int | None = None, adaptive_weights=(0.1, 1.0, 10.0)) -> dict:
    """Stage-II model (eval mode): accuracy and mean W1 = 1 − W0 under PGD-n at each strength
    of ``cfg.eval_fracs``·max_eps (0: clean); FGSM and CW∞ at max_eps; the adaptive attack
    (PGD on CE + c·BCE(W0, 0), pushing the generator towards the clean branch) at max_eps,
    worst over ``adaptive_weights``; and W1's rank correlation with ε over every sample."""
    model.eval()
    steps = cfg.eval_steps if steps is None else steps
    dev = next(model.parameters()).device
    gen = torch.Generator(dev).manual_seed(0)
    E = cfg.max_eps
    attacks = {}
    for f in cfg.eval_fracs:
        e = f * E
        attacks[f"PGD-{steps} eps={e:.4g}"] = (e, None if e == 0 else RelativePGD(
            model, e, cfg.alpha_ratio, steps, generator=gen))
    attacks[f"FGSM eps={E:.4g}"] = (E, FGSM(model, E))
    attacks[f"CW-inf eps={E:.4g}"] = (E, RelativePGD(model, E, cfg.alpha_ratio, steps,
                                                     loss="cw", generator=gen))
    for c in adaptive_weights:
        def loss(out, y, c=c):
            logits, w0 = out
            return F.cross_entropy(logits, y) + c * F.binary_cross_entropy(
                w0, torch.zeros_like(w0))
        attacks[f"adaptive c={c:g}"] = (E, RelativePGD(model, E, cfg.alpha_ratio, steps,
                                                       loss=loss, generator=gen))
    correct = {k: 0 for k in attacks}
    w1_sum = {k: 0.0 for k in attacks}
    eps_all, w1_all = [], []
    n = 0
    bar = tqdm(total=len(split), desc="AFA evaluation", disable=not progress, leave=False)
    for x, y in data_mod.Batches(split, batch_size):
        x, y = x.to(dev), y.to(dev)
        for name, (e, atk) in attacks.items():
            kw = {"return_weight": True} if name.startswith("adaptive") else {}
            xa = x if atk is None else atk(x, y, **kw)
            pred, w0 = _predict(model, xa)
            correct[name] += int((pred == y).sum())
            w1_sum[name] += float((1 - w0).sum())
            if name.startswith("PGD"):
                eps_all.append(torch.full((len(y),), e))
                w1_all.append((1 - w0).cpu())
        n += len(y)
        bar.update(len(y))
    bar.close()
    rows = [{"attack": k, "eps": attacks[k][0], "acc": correct[k] / n, "W1": w1_sum[k] / n}
            for k in attacks]
    adaptive = [r for r in rows if r["attack"].startswith("adaptive")]
    worst = min(adaptive, key=lambda r: r["acc"]) if adaptive else None
    return {"rows": rows, "adaptive_worst": worst,
            "w1_eps_rank_correlation": rank_correlation(torch.cat(eps_all), torch.cat(w1_all))}


def report_afa(result: dict, cfg: AFAConfig, out: str, title: str) -> None:
    """Table on the terminal, results.json, and the W1-versus-ε / accuracy-versus-ε plot."""
    rows = result["rows"]
    print(format_table([dict(r, pct=100 * r["acc"]) for r in rows],
                       [("attack", "attack", "{}"), ("eps", "eps", "{:.4g}"),
                        ("pct", "acc %", "{:.1f}"), ("W1", "mean W1", "{:.3f}")]))
    print(f"W1 vs eps rank correlation (PGD, every sample): "
          f"{result['w1_eps_rank_correlation']:+.3f}")
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "results.json"), {"title": title, **result,
                                                   "config": dataclasses.asdict(cfg)})
    pgd = [r for r in rows if r["attack"].startswith("PGD")]
    fig, ax = pyplot().subplots(1, 2, figsize=(9, 3.6))
    eps = [r["eps"] for r in pgd]
    ax[0].plot(eps, [r["W1"] for r in pgd], "o-")
    ax[0].set(xlabel="attack strength ε (PGD)", ylabel="mean W1 (weight on BN_adv)",
              title="the generator's weight vs ε")
    ax[1].plot(eps, [100 * r["acc"] for r in pgd], "o-")
    ax[1].set(xlabel="attack strength ε (PGD)", ylabel="accuracy %", title="accuracy vs ε")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "w1_vs_eps.png"))
    print(f"results: {os.path.join(out, 'results.json')}; plot: "
          f"{os.path.join(out, 'w1_vs_eps.png')}")
