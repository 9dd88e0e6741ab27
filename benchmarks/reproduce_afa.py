"""AFA's central claim at digits scale (`python benchmarks/reproduce.py afa`).

The paper's Table 1 (CIFAR-10, PGD-AT): stage II's mixing raises clean accuracy over the
PGD-AT model (ε=0: 86.9 → 95.8) and keeps its robustness (ε=8/255: 46.2 → 50.0); its Fig. 6:
the generator's W1 (the weight on BN_adv) rises with ε. Here, per seed, one AFA run on the
digits with the trainer's digits defaults (strengths 0..0.3), then PGD at {0, 1, 2, 4, 8}/8 of
max_eps against three models that share every weight but the BN routing:

- stage I through BN_0 only (the clean branch),
- stage I through BN_{K-1} only (the adversarial branch, the comparison the claim names),
- stage II, the generator's per-sample mixing of the two (AFA),

beside the paper's own baseline, a one-BN ResNet-18 of the same width trained with PGD-AT at
max_eps for the stage-I epochs (`fastrobust.trainers.awnet.train_teacher`: SGD, cosine), and
the rank correlation of W1 with ε over every attacked test sample.
"""
from __future__ import annotations

import contextlib
import os

import torch

from fastrobust.attacks import evaluate
from fastrobust.attacks.evaluate import batches_of
from fastrobust.trainers.afa import AFAConfig, AFATrainer, RelativePGD, evaluate_afa
from fastrobust.trainers.awnet import AWNetConfig, train_teacher
from fastrobust.trainers.results import pyplot, save_figure

# The reproduction's budget: a few minutes per seed on one CPU thread.
SETTINGS = dict(width=8, epochs=10, epochs2=5, batch_size=64, steps=3, eval_steps=10)
PGDAT, BN0, BNADV, AFA = "PGD-AT (one BN)", "stage I, BN_0", "stage I, BN_adv", "AFA (stage II)"
MODELS = (PGDAT, BN0, BNADV, AFA)


@contextlib.contextmanager
def _stage(model, stage: int):
    old, model.stage = model.stage, stage
    try:
        yield model
    finally:
        model.stage = old


def branch_accuracy(model, split, cfg: AFAConfig, branch: int | None, steps: int,
                    batch_size: int = 256) -> list[float]:
    """Accuracy per strength of ``cfg.eval_fracs`` (PGD-``steps``, step ratio·ε, as
    `evaluate_afa`) of the stage-I network with every sample through BN ``branch`` (None:
    a model without branches)."""
    gen = torch.Generator().manual_seed(0)
    loader = batches_of(split.x, split.y, batch_size)
    out = []
    with _stage(model, 1) if branch is not None else contextlib.nullcontext():
        for f in cfg.eval_fracs:
            e = f * cfg.max_eps
            if e == 0:
                out.append(evaluate(model, loader, branch=branch, progress=False)["SA"])
                continue
            atk = RelativePGD(model, e, cfg.alpha_ratio, steps, generator=gen)
            out.append(evaluate(model, loader, {"pgd": atk}, branch=branch,
                                progress=False)["RA"]["pgd"])
    return out


def run_seed(seed: int, out: str, progress: bool = True, log=print, **overrides) -> dict:
    """One AFA run (digits defaults, `SETTINGS` with ``overrides``) and its three rows."""
    cfg = AFAConfig(**{**SETTINGS, **overrides, "seed": seed,
                       "out": os.path.join(out, f"afa-seed{seed}")})
    tr = AFATrainer(cfg, progress=progress)
    tr.fit(log=log)
    model, test = tr.model.eval(), tr.data.test
    res = evaluate_afa(model, test, cfg, progress=progress, adaptive_weights=())
    pgd = [r for r in res["rows"] if r["attack"].startswith("PGD")]
    K = cfg.num_branches
    at_cfg = AWNetConfig(width=cfg.width, teacher_epochs=cfg.epochs, batch_size=cfg.batch_size,
                         lr=cfg.lr, eps=cfg.max_eps, alpha=cfg.alpha_ratio * cfg.max_eps,
                         steps=cfg.steps, seed=seed, max_train_batches=cfg.max_train_batches,
                         out=cfg.out)
    at_cfg.validate()
    pgd_at = train_teacher(tr.data, at_cfg, True, tr.device, progress, log=lambda *a: None)
    return {"seed": seed, "eps": [r["eps"] for r in pgd],
            "acc": {PGDAT: branch_accuracy(pgd_at, test, cfg, None, cfg.eval_steps),
                    BN0: branch_accuracy(model, test, cfg, 0, cfg.eval_steps),
                    BNADV: branch_accuracy(model, test, cfg, K - 1, cfg.eval_steps),
                    AFA: [r["acc"] for r in pgd]},
            "W1": [r["W1"] for r in pgd],
            "rank_correlation": res["w1_eps_rank_correlation"],
            "seconds": sum(h["seconds"] for h in tr.history),
            "config": {k: getattr(cfg, k) for k in ("dataset", "width", "epochs", "epochs2",
                                                    "lr", "lr2", "max_eps", "steps",
                                                    "eval_steps", "num_branches")}}


def verdict(r: dict) -> dict:
    """The claims of one seed against stage I's BN_adv (and, ``*_at``, the PGD-AT model):
    clean accuracy up (ε = 0), robustness kept (at max_eps, within 2 points or above); and
    whether W1 rises with ε."""
    afa, out = r["acc"][AFA], {}
    for suffix, name in (("", BNADV), ("_at", PGDAT)):
        if name in r["acc"]:
            ref = r["acc"][name]
            out.update({f"clean_gain{suffix}": afa[0] - ref[0],
                        f"robust_change{suffix}": afa[-1] - ref[-1],
                        f"clean_up{suffix}": afa[0] > ref[0],
                        f"robust_kept{suffix}": afa[-1] >= ref[-1] - 0.02})
    out["w1_rises"] = r["rank_correlation"] > 0 and r["W1"][-1] > r["W1"][0]
    return out


def table(results: list[dict]) -> str:
    """The markdown table of the runs: accuracy per ε and its average per model, W1 per ε."""
    eps = results[0]["eps"]
    head = "| seed | model | " + " | ".join(f"ε={e:.4g}" for e in eps) + " | avg |"
    lines = [head, "|" + "---|" * (len(eps) + 3)]
    for r in results:
        for name in MODELS:
            acc = r["acc"][name]
            cells = " | ".join(f"{100 * a:.1f}" for a in acc)
            lines.append(f"| {r['seed']} | {name} | {cells} | {100 * sum(acc) / len(acc):.1f} |")
        w = " | ".join(f"{v:.3f}" for v in r["W1"])
        lines.append(f"| {r['seed']} | mean W1 (AFA) | {w} | ρ = {r['rank_correlation']:+.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Accuracy against ε per model (one line per seed), and W1 against ε."""
    fig, (ax, ax2) = pyplot().subplots(1, 2, figsize=(10, 4))
    colors = dict(zip(MODELS, ("tab:gray", "tab:blue", "tab:red", "tab:green")))
    styles = ("-", "--", ":")
    for i, r in enumerate(results):
        for name in MODELS:
            ax.plot(r["eps"], [100 * a for a in r["acc"][name]], "o" + styles[i % 3],
                    color=colors[name], label=name if i == 0 else None, markersize=4)
        ax.plot([], [], "k" + styles[i % 3], label=f"seed {r['seed']}")
        ax2.plot(r["eps"], r["W1"], "o" + styles[i % 3], color="tab:green",
                 label=f"seed {r['seed']} (ρ = {r['rank_correlation']:+.2f})")
    ax.set(xlabel="PGD ε (digits, pixels in [0, 1])", ylabel="accuracy (%)",
           title="accuracy against attack strength")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax2.set(xlabel="PGD ε", ylabel="mean W1 (weight on BN_adv)", ylim=(0, 1),
            title="the weight generator's W1 against ε")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle("AFA on digits: stage II mixing against stage I's branches", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def summary(r: dict) -> str:
    """One seed's verdict in a line."""
    v = verdict(r)
    return (f"seed {r['seed']}: AFA against BN_adv: clean {100 * v['clean_gain']:+.1f} "
            f"points, at max eps {100 * v['robust_change']:+.1f}; against PGD-AT: "
            f"{100 * v['clean_gain_at']:+.1f}, {100 * v['robust_change_at']:+.1f}; W1 rank "
            f"correlation with eps {r['rank_correlation']:+.2f}; AFA trained in "
            f"{r['seconds']:.0f} s")
