"""The OAT training step of bench_train_step.py with the implementations interleaved: round r
runs every implementation once, in turn, so a drift of the machine's speed (this VM's shifts
by 20-30 % over tens of seconds) falls on all of them alike. Prints each one's median and the
ratios to the first. pytest-benchmark, which runs one implementation's rounds back to back,
stays the record; this is the cross-check.

    python benchmarks/interleaved_train_step.py [--rounds 15] [--impls fused,eager_oat,...]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_train_step as b  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--impls", default=",".join(b.IMPLS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--steps", type=int, default=7)
    args = p.parse_args(argv)
    impls = args.impls.split(",")
    steps = {}
    for impl in impls:
        torch._dynamo.reset()
        model, x, y, lam, start = b.setup(args.batch, args.width, args.steps)
        steps[impl] = b.make_step(impl, model, x, y, lam, start, args.steps)
        for _ in range(2):  # warm-up (and torch.compile's compilation)
            steps[impl]()
    times = {i: [] for i in impls}
    for _ in range(args.rounds):
        for impl in impls:
            t = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - t)
    med = {i: statistics.median(v) * 1e3 for i, v in times.items()}
    print(f"OAT step, ResNet-18/w{args.width}, batch {args.batch}, PGD-{args.steps}, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for impl in impls:
        print(f"  {impl:<20} median {med[impl]:8.2f} ms   {impls[0]} is faster by "
              f"{med[impl] / med[impls[0]]:.2f}x")


if __name__ == "__main__":
    main()
