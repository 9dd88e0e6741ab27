"""Shared benchmark plumbing: the measured copy bandwidth, byte-model bookkeeping, and a summary
table (median per implementation, speedup of the fused kernel against each baseline of its group,
GB/s and fraction of copy bandwidth) printed at the end and written to $BENCH_RESULTS if set.

Run: pytest benchmarks/ --benchmark-only      (full)
     BENCH_QUICK=1 pytest benchmarks/ --benchmark-disable   (smoke: each case once)
"""
from __future__ import annotations

import datetime
import os
import platform
import time

import pytest
import torch

QUICK = os.environ.get("BENCH_QUICK") == "1"
_copy_cache: dict[int, float] = {}


def copy_bandwidth(nbytes: int, device="cpu") -> float:
    """Measured GB/s of `dst.copy_(src)` for a tensor of nbytes (read + write counted), the
    practical limit of a memory-bound op of that size on this machine (median of 30)."""
    if nbytes not in _copy_cache:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        for _ in range(5):
            dst.copy_(src)
        times = []
        for _ in range(30):
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
        _copy_cache[nbytes] = 2 * nbytes / sorted(times)[len(times) // 2] / 1e9
    return _copy_cache[nbytes]


def record(benchmark, *, impl: str, nbytes: int, tensor_bytes: int, fused: bool = False):
    """Attach the byte model (nbytes moved by an ideal implementation) to a benchmark, with the
    copy bandwidth measured at the op's tensor size; GB/s are filled in from the median."""
    benchmark.extra_info.update(impl=impl, bytes=nbytes, fused=fused,
                                copy_GBps=round(copy_bandwidth(tensor_bytes), 1))


def _rows(session):
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        if not bench.stats or not bench.extra_info.get("impl"):
            continue
        med = bench.stats.median
        info = bench.extra_info
        info["GBps"] = round(info["bytes"] / med / 1e9, 1)
        info["frac_of_copy"] = round(info["GBps"] / info["copy_GBps"], 2)
        groups.setdefault(bench.group, []).append((info["impl"], med, info))
    lines = []
    for group, items in groups.items():
        fused = [med for impl, med, info in items if info["fused"]]
        for impl, med, info in sorted(items, key=lambda t: t[1]):
            speed = f"{med / fused[0]:.2f}x" if fused and not info["fused"] else ""
            lines.append(f"| {group} | {impl} | {med * 1e3:.3f} | {info['GBps']} | "
                         f"{info['frac_of_copy']} | {speed} |")
    return lines


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    rows = _rows(session)
    if not rows:
        return
    head = [f"fastrobust benchmarks, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}",
            "",
            "| group | implementation | median ms | GB/s (byte model) | of copy BW | fused is faster by |",
            "|---|---|---|---|---|---|"]
    text = "\n".join(head + rows)
    terminalreporter.write_line("")
    terminalreporter.write_line(text)
    out = os.environ.get("BENCH_RESULTS")
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
