"""AW-Net's central claims at digits scale (`python benchmarks/reproduce.py awnet`).

The paper's Table 3 (CIFAR-10, W-robust = ½·SA + ½·RA): dynamic weights only (one BN) 44.1 %
< + MixBN with BN_adv alone at test time 67.3 % < + the type head mixing the BNs 72.3 %,
against 70.5 % for the baseline ResNet-18. Here, per seed, on the digits with the trainer's
digits defaults (ε 0.3, α ε/4): the standard and PGD-AT teachers (trained once, shared), then

- AW-Net with one BN (`--single-bn`): the dynamic weights only,
- AW-Net with MixBN, evaluated with BN_adv alone (`test_bn = "adv"`),
- the same network with the detector's mixing (the final AW-Net),

each evaluated against its own white-box PGD (and CW∞), beside the two teachers.
"""
from __future__ import annotations

import os

from fastrobust.trainers.awnet import AWNetConfig, AWNetTrainer, evaluate_awnet
from fastrobust.trainers.results import pyplot, save_figure

# The reproduction's budget: a few minutes per seed on one CPU thread.
SETTINGS = dict(width=8, epochs=12, teacher_epochs=4, batch_size=64, lr=0.05, steps=5,
                eval_steps=10)
ROWS = ("dynamic weights only", "+ MixBN (BN_adv at test)", "+ type head (AW-Net)",
        "PGD-AT teacher", "standard teacher")


def run_seed(seed: int, out: str, progress: bool = True, log=print, **overrides) -> dict:
    """The two AW-Net trainings of one seed (one BN, MixBN) on shared teachers, and the five
    rows of the ablation, each {SA, FGSM, PGD-n, CW-inf, W-robust[, detector]}."""
    base = {**SETTINGS, **overrides, "seed": seed}
    mix_dir = os.path.join(out, f"awnet-seed{seed}")
    full = AWNetTrainer(AWNetConfig(**base, out=mix_dir), progress=progress, log=log)
    full.fit(log=log)
    cfg = full.cfg
    teachers = {"teacher_nat": os.path.join(mix_dir, "teacher_nat.pt"),
                "teacher_adv": os.path.join(mix_dir, "teacher_adv.pt")}
    single = AWNetTrainer(AWNetConfig(**base, **teachers, mix_bn=False,
                                      out=os.path.join(out, f"awnet-single-seed{seed}")),
                          progress=progress, log=log)
    single.fit(log=log)
    test = full.data.test

    def ev(model, baselines=None):
        return evaluate_awnet(model, test, cfg, progress=progress, baselines=baselines)

    rows = {ROWS[0]: ev(single.model)["AW-Net"]}
    full.model.test_bn = "adv"
    rows[ROWS[1]] = ev(full.model)["AW-Net"]
    full.model.test_bn = "detector"
    r = ev(full.model, {ROWS[3]: full.teacher_adv, ROWS[4]: full.teacher_nat})
    rows[ROWS[2]], rows[ROWS[3]], rows[ROWS[4]] = r["AW-Net"], r[ROWS[3]], r[ROWS[4]]
    seconds = sum(h["seconds"] for h in full.history + single.history)
    return {"seed": seed, "rows": rows, "pgd": f"PGD-{cfg.eval_steps}",
            "seconds_awnet": seconds,
            "config": {k: getattr(cfg, k) for k in ("dataset", "width", "epochs",
                                                    "teacher_epochs", "lr", "eps", "alpha",
                                                    "steps", "eval_steps")}}


def verdict(r: dict) -> dict:
    """Table 3's order (one BN < BN_adv alone < the detector's mixing, in W-robust) and the
    final model's W-robust against its PGD-AT teacher's."""
    w = [r["rows"][name]["W-robust"] for name in ROWS]
    return {"ablation_order": w[0] < w[1] < w[2], "above_teacher": w[2] > w[3],
            "w_robust": dict(zip(ROWS, w))}


def table(results: list[dict]) -> str:
    """The markdown table: SA, FGSM, PGD-n, CW∞, W-robust and the detector's accuracy."""
    pgd = results[0]["pgd"]
    keys = ("SA", "FGSM", pgd, "CW-inf", "W-robust")
    lines = ["| seed | model | " + " | ".join(f"{k} %" for k in keys) + " | detector % |",
             "|" + "---|" * (len(keys) + 3)]
    for r in results:
        for name in ROWS:
            row = r["rows"][name]
            cells = " | ".join(f"{100 * row[k]:.1f}" for k in keys)
            det = f"{100 * row['detector']:.1f}" if "detector" in row else "-"
            lines.append(f"| {r['seed']} | {name} | {cells} | {det} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """W-robust (and SA, RA) of each row, bars per seed."""
    pgd = results[0]["pgd"]
    fig, axes = pyplot().subplots(1, len(results), figsize=(max(7.0, 5.5 * len(results)), 4.4),
                             squeeze=False)
    for ax, r in zip(axes[0], results):
        x = range(len(ROWS))
        for k, (key, off, color) in enumerate((("SA", -0.27, "tab:blue"),
                                               (pgd, 0.0, "tab:red"),
                                               ("W-robust", 0.27, "tab:green"))):
            vals = [100 * r["rows"][name][key] for name in ROWS]
            bars = ax.bar([i + off for i in x], vals, 0.27, color=color, label=key)
            if key == "W-robust":
                ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(list(x), [n.replace(" (", "\n(") for n in ROWS], fontsize=7,
                      rotation=20)
        ax.set(ylabel="accuracy (%)", ylim=(0, 120), yticks=range(0, 101, 20),
               title=f"seed {r['seed']}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", ncol=3)
    eps = results[0]["config"]["eps"]
    fig.suptitle(f"AW-Net ablation on digits (ε = {eps:g}, {pgd}; W-robust = ½SA + ½RA)\n"
                 "the paper's Table 3 order: dynamic weights < + MixBN < + type head",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def summary(r: dict) -> str:
    """One seed's verdict in a line."""
    v = verdict(r)
    w = v["w_robust"]
    order = "the paper's order" if v["ablation_order"] else "NOT the paper's order"
    return (f"seed {r['seed']}: W-robust " + ", ".join(
        f"{n} {100 * w[n]:.1f}" for n in ROWS[:3]) +
        f" ({order}); AW-Net {100 * w[ROWS[2]]:.1f} against the PGD-AT teacher's "
        f"{100 * w[ROWS[3]]:.1f}")
