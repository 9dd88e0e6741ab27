"""AFA's central claim at digits scale (`python benchmarks/reproduce.py afa`).

The paper's Table 1 (CIFAR-10, PGD-AT): stage II's mixing raises clean accuracy over the
PGD-AT model (ε=0: 86.9 → 95.8) and keeps its robustness (ε=8/255: 46.2 → 50.0); its Fig. 6:
the generator's W1 (the weight on BN_adv) rises with ε. Here, per seed, one AFA run on the
digits with the trainer's digits defaults (strengths 0..0.3), then PGD at {0, 1, 2, 4, 8}/8 of
max_eps against three models that share every weight but the BN routing:

- stage I through BN_0 only (the clean branch),
- stage I through BN_{K-1} only (the adversarial branch: the PGD-AT model of the comparison),
- stage II, the generator's per-sample mixing of the two (AFA),

and the rank correlation of W1 with ε over every attacked test sample.
"""
from __future__ import annotations

import contextlib
import os

import torch

from fastrobust.attacks import evaluate
from fastrobust.attacks.evaluate import batches_of
from fastrobust.trainers.afa import AFAConfig, AFATrainer, RelativePGD, evaluate_afa

# The reproduction's budget: a few minutes per seed on one CPU thread.
SETTINGS = dict(width=8, epochs=6, epochs2=4, batch_size=64, steps=3, eval_steps=10)
MODELS = ("stage I, BN_0", "stage I, BN_adv", "AFA (stage II)")


@contextlib.contextmanager
def _stage(model, stage: int):
    old, model.stage = model.stage, stage
    try:
        yield model
    finally:
        model.stage = old


def branch_accuracy(model, split, cfg: AFAConfig, branch: int, steps: int,
                    batch_size: int = 256) -> list[float]:
    """Accuracy per strength of ``cfg.eval_fracs`` (PGD-``steps``, step ratio·ε, as
    `evaluate_afa`) of the stage-I network with every sample through BN ``branch``."""
    gen = torch.Generator().manual_seed(0)
    loader = batches_of(split.x, split.y, batch_size)
    out = []
    with _stage(model, 1):
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
    return {"seed": seed, "eps": [r["eps"] for r in pgd],
            "acc": {MODELS[0]: branch_accuracy(model, test, cfg, 0, cfg.eval_steps),
                    MODELS[1]: branch_accuracy(model, test, cfg, K - 1, cfg.eval_steps),
                    MODELS[2]: [r["acc"] for r in pgd]},
            "W1": [r["W1"] for r in pgd],
            "rank_correlation": res["w1_eps_rank_correlation"],
            "seconds": sum(h["seconds"] for h in tr.history),
            "config": {k: getattr(cfg, k) for k in ("dataset", "width", "epochs", "epochs2",
                                                    "lr", "lr2", "max_eps", "steps",
                                                    "eval_steps", "num_branches")}}


def verdict(r: dict) -> dict:
    """The two claims of one seed: clean accuracy up (stage II against BN_adv at ε = 0) and
    robustness kept (at max_eps, within 2 points or above), and whether W1 rises with ε."""
    adv, afa = r["acc"][MODELS[1]], r["acc"][MODELS[2]]
    return {"clean_gain": afa[0] - adv[0], "robust_change": afa[-1] - adv[-1],
            "clean_up": afa[0] > adv[0], "robust_kept": afa[-1] >= adv[-1] - 0.02,
            "w1_rises": r["rank_correlation"] > 0 and r["W1"][-1] > r["W1"][0]}


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = dict(zip(MODELS, ("tab:blue", "tab:red", "tab:green")))
    styles = ("-", "--", ":")
    for i, r in enumerate(results):
        for name in MODELS:
            ax.plot(r["eps"], [100 * a for a in r["acc"][name]], "o" + styles[i % 3],
                    color=colors[name], label=f"{name}, seed {r['seed']}", markersize=4)
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(seeds, out: str, plot_path: str, progress: bool = True, **overrides) -> list[dict]:
    results = [run_seed(s, out, progress, **overrides) for s in seeds]
    print(table(results))
    for r in results:
        v = verdict(r)
        print(f"seed {r['seed']}: clean {100 * v['clean_gain']:+.1f} points over BN_adv, "
              f"at max eps {100 * v['robust_change']:+.1f}; W1 rank correlation with eps "
              f"{r['rank_correlation']:+.2f}; {r['seconds']:.0f} s of training")
    plot(results, plot_path)
    return results
