"""`fastrobust demo`: OAT on scikit-learn's digits in a few minutes on a CPU, beside dedicated
models at λ = 0 (standard training) and λ = 1 (PGD-AT) trained with the same budget, then the
λ table and the trade-off plot: OAT's claim is that its one model reaches both ends."""
from __future__ import annotations

import time

from .trainers.dedicated import evaluate_dedicated, train_dedicated
from .trainers.oat import OATConfig, OATTrainer, report, sweep


def run_demo(cfg: OATConfig, dedicated: bool = True, progress: bool = False) -> int:
    t0 = time.perf_counter()
    print(f"\nOAT on scikit-learn's digits (8x8, 1,437 train / 360 test images): ResNet-18 "
          f"of width {cfg.width} with dual BN and FiLM, {cfg.epochs} epochs, PGD-{cfg.steps} "
          f"with eps {cfg.eps:g} (pixels in [0, 1], step {cfg.step_size():.3g}), lambdas "
          f"{list(cfg.lambdas)}" + ("; then dedicated ResNet-18s at lambda 0 and 1 with the "
                                    "same budget" if dedicated else "") + "\n")
    trainer = OATTrainer(cfg, progress=progress)
    trainer.fit()
    print(f"\nOAT training took {time.perf_counter() - t0:.0f} s")
    baselines = []
    if dedicated:
        for lam in (0.0, 1.0):
            t = time.perf_counter()
            model = train_dedicated(cfg, lam, trainer.data, progress=progress, log=None)
            baselines.append(evaluate_dedicated(model, trainer.data.test, cfg, lam))
            print(f"dedicated model at lambda {lam:g}: {time.perf_counter() - t:.0f} s")
    print(f"evaluating every lambda (PGD-{cfg.eval_steps})\n")
    rows = sweep(trainer.model.eval(), trainer.data.test, cfg, progress=progress)
    report({"": rows}, cfg, cfg.out, "OAT demo: ResNet-18 on digits", dedicated=baselines)
    by = {r["lambda"]: r for r in rows}
    lo, hi = by[0.0], by[1.0]
    shown = lo["SA"] > hi["SA"] and hi["RA"] > lo["RA"]
    verdict = ("one model, both ends of the trade-off" if shown
               else "no clear trade-off in this run (try more --epochs)")
    print(f"\nOAT lambda=0: SA {100 * lo['SA']:.1f}%, RA {100 * lo['RA']:.1f}%;  lambda=1: "
          f"SA {100 * hi['SA']:.1f}%, RA {100 * hi['RA']:.1f}%: {verdict}")
    for r in baselines:
        print(f"dedicated lambda={r['lambda']:g}: SA {100 * r['SA']:.1f}%, "
              f"RA {100 * r['RA']:.1f}%")
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    return 0
