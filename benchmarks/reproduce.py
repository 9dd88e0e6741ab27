"""Each paper's central claim, reproduced at digits scale on this CPU (docs/reproductions.md).

    python benchmarks/reproduce.py afa      # AFA: stage II's mixing against stage I's branches
    python benchmarks/reproduce.py awnet    # AW-Net: Table 3's ablation order, vs PGD-AT

(OAT's, one model against dedicated ones at each λ: python benchmarks/reproduce_oat.py.)

Seeded (--seeds, default 0 1) and on one CPU thread unless --threads says otherwise, so a rerun
on the same machine prints the same table. Writes the markdown table to stdout, the plot to
docs/reproductions_<method>.png and the numbers to <out>/<method>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from fastrobust.cli.console import Parser  # one-line errors, as the fastrobust command's

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"afa": "reproduce_afa", "awnet": "reproduce_awnet"}


def main(argv=None) -> int:
    p = Parser(prog="reproduce.py", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=sorted(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="default 0 1")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default="runs/reproduce",
                   help="runs and JSON results (default runs/reproduce)")
    p.add_argument("--plot", help="the PNG (default docs/reproductions_<method>.png)")
    p.add_argument("--from-json", dest="from_json",
                   help="no training: the table and plot of a run's <method>.json")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if any(s < 0 for s in args.seeds):
        p.error(f"--seeds must be >= 0, got {args.seeds}")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    module = __import__(METHODS[args.method])
    plot = args.plot or os.path.join(ROOT, "docs", f"reproductions_{args.method}.png")
    if args.from_json:
        try:
            with open(args.from_json) as f:
                results = json.load(f)["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--from-json: {args.from_json} is not a {args.method}.json this script "
                    f"wrote ({type(e).__name__}: {e})")
        print(module.table(results))
        module.plot(results, plot)
        print(f"plot: {plot}")
        return 0
    t0 = time.perf_counter()
    results = [module.run_seed(s, args.out, progress=sys.stderr.isatty()) for s in args.seeds]
    print(module.table(results))
    for r in results:
        print(module.summary(r))
    module.plot(results, plot)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.method}.json")
    with open(path, "w") as f:
        json.dump({"results": results, "verdicts": [module.verdict(r) for r in results],
                   "threads": args.threads, "torch": torch.__version__}, f, indent=2)
    print(f"{time.perf_counter() - t0:.0f} s in all, {args.threads} thread(s); results: "
          f"{path}; plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
