"""What synchronizing the multi-branch BNs costs a DDP OAT step: two ranks (gloo on the CPU,
one thread each, or NCCL on two GPUs with --device cuda) run the same steps with the BNs
synchronized (one all-reduce per BN layer forward and one backward) and with per-rank
statistics (DDP's gradient all-reduce only), alternately; prints the median step times and the
all-reduce calls per step.

    python benchmarks/ddp_sync_overhead.py [--steps 15] [--width 16] [--batch 64]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from collectives import AllReduceCounter
from fastrobust.trainers.oat import OATConfig, OATTrainer, sample_lambdas


def _worker(rank, store, args):
    torch.set_num_threads(1)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=2)
    warnings.filterwarnings("ignore")

    trainers = {}
    for sync in (True, False):
        cfg = OATConfig(dataset="digits", arch="resnet18", width=args.width,
                        batch_size=args.batch, steps=7, eps=0.3, alpha=0.075, sync_bn=sync,
                        device=args.device, out=os.path.join(os.path.dirname(store), str(sync)))
        trainers[sync] = OATTrainer(cfg, progress=False)
    g = torch.Generator().manual_seed(0)
    n, half = args.batch, args.batch // 2
    part = slice(rank * half, (rank + 1) * half)
    times = {True: [], False: []}
    calls = {}
    for i in range(args.steps + 2):
        x, y = torch.rand(n, 1, 8, 8), torch.randint(0, 10, (n,))
        lam = sample_lambdas(n, trainers[True].cfg, g)
        for sync, tr in trainers.items():
            xs = x[part].to(tr.device).contiguous(memory_format=tr.memory_format)
            dist.barrier()
            if i == 0:  # a warm-up step counts the op's all-reduces (a dispatch mode: untimed)
                with AllReduceCounter() as c:
                    tr.step(xs, y[part].to(tr.device), lam[part], n)
                calls[sync] = c.n
                continue
            t = time.perf_counter()
            tr.step(xs, y[part].to(tr.device), lam[part], n)
            if args.device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            if i >= 2:
                times[sync].append(dt)
    if rank == 0:
        med = {s: statistics.median(v) * 1e3 for s, v in times.items()}
        print(f"DDP OAT step, 2 ranks ({backend}), ResNet-18/w{args.width}, global batch "
              f"{n}, PGD-7, {args.steps} steps each, alternated; torch {torch.__version__}")
        print(f"  synchronized BN   median {med[True]:7.1f} ms   op all-reduces per step "
              f"{calls[True]} (DDP's gradient buckets use their own collectives)")
        print(f"  per-rank BN       median {med[False]:7.1f} ms   op all-reduces per step "
              f"{calls[False]}")
        print(f"  overhead of synchronizing: {med[True] - med[False]:+.1f} ms per step "
              f"({100 * (med[True] / med[False] - 1):+.1f} %)")
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "store"), args), nprocs=2, join=True)


if __name__ == "__main__":
    sys.exit(main())
