"""Shared benchmark plumbing: the measured copy bandwidth, byte-model bookkeeping, and a summary
table (median per implementation, speedup of the fused kernel against each baseline of its group,
GB/s and fraction of copy bandwidth) printed at the end and written to $BENCH_RESULTS if set.

Run: pytest benchmarks/ --benchmark-only      (full)
     BENCH_QUICK=1 pytest benchmarks/ --benchmark-disable   (smoke: each case once)
"""
from __future__ import annotations

import datetime
import importlib
import os
import platform
import time

import pytest


def _huge_pages() -> str:
    """Tensors of 2 MB and more in transparent huge pages, for every implementation alike:
    PyTorch's CPU allocator does that when THP_MEM_ALLOC_ENABLE=1 is set before its first
    allocation (so before torch is imported here). With 4 KiB pages, whether a tensor sits in
    huge-page memory is the heap's luck: the CPU kernels ask for huge pages on the outputs of
    32 MiB and more they allocate, and a later, smaller tensor that lands in that memory after
    it is freed is served from huge pages, another is not. At 512 × 4×4, N = 128, K = 2,
    forward+backward, the fused op took 865-1402 µs in four processes with 4 KiB pages and
    824-961 µs with huge pages, its ratio to the compiled OAT dual BN 1.31-1.42× and
    1.39-1.50× (one process each, 150 paired rounds). BENCH_THP=0 keeps 4 KiB pages (and the
    kernels' own requests)."""
    import sys

    if os.environ.get("BENCH_THP") == "0" or platform.system() != "Linux":
        return "4 KiB pages (but the CPU kernels' outputs of 32 MiB and more)"
    if "torch" in sys.modules:
        return "4 KiB pages (torch was imported before THP_MEM_ALLOC_ENABLE could be set)"
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        mode = ""
    if "[never]" in mode or not mode:
        return "4 KiB pages (transparent huge pages are off in this kernel)"
    return "tensors of 2 MB and more in huge pages (THP_MEM_ALLOC_ENABLE=1)"


PAGES = _huge_pages()

import torch  # noqa: E402 - after THP_MEM_ALLOC_ENABLE

QUICK = os.environ.get("BENCH_QUICK") == "1"


def _keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory mapped (no mmap per large block, no trimming of the
    heap), for every implementation alike; returns how memory is served, for the results' header.

    By default glibc serves a block of a few MB from a fresh mmap or from a heap it trims again
    when the block is freed, depending on the heap's state, so a call may fault in its whole
    output (N128 C512 4x4: ~350 page faults a call, the call two to three times slower) or none.
    Which implementation of a group pays that is the heap's luck, not its kernel's speed (the copy
    bandwidth, timed into reused memory, never pays it). jemalloc or tcmalloc, or these two
    settings (MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>), give a training run the same.
    BENCH_MALLOC=default keeps glibc's defaults."""
    if os.environ.get("BENCH_MALLOC") == "default" or platform.system() != "Linux":
        return "the C library's default allocator settings"
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**30) == 1
    except (OSError, AttributeError):
        ok = False
    return ("freed memory kept mapped (glibc: no mmap per block, no heap trimming)" if ok
            else "the C library's default allocator settings (mallopt unavailable)")


MALLOC = _keep_freed_memory()
_copy_cache: dict[int, float] = {}
# The copy bandwidth is timed with the benchmarks' own timer (--benchmark-timer; e.g.
# time.process_time for one-thread runs on a loaded machine), so their ratios compare alike.
_timer = {"fn": time.perf_counter}


def pytest_configure(config):
    try:
        timer = config.getoption("benchmark_timer")
    except ValueError:  # pytest-benchmark not installed
        return
    if isinstance(timer, str):  # "module.function", as pytest-benchmark reads it
        module, _, name = timer.rpartition(".")
        timer = getattr(importlib.import_module(module), name)
    if timer is not None:
        _timer["fn"] = timer


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
            t = _timer["fn"]()
            dst.copy_(src)
            times.append(_timer["fn"]() - t)
        _copy_cache[nbytes] = 2 * nbytes / sorted(times)[len(times) // 2] / 1e9
    return _copy_cache[nbytes]


DRAM_BYTES = 256 * 2**20  # far beyond the last-level cache: the machine's memory bandwidth


def record(benchmark, *, impl: str, nbytes: int, tensor_bytes: int, fused: bool = False):
    """Attach the byte model (nbytes moved by an ideal implementation) to a benchmark, with two
    copy bandwidths: at the op's tensor size (cache-resident when it fits) and at 256 MB (DRAM).
    GB/s, fractions and speedups are filled in from the medians at the end of the session.
    nbytes=0: no byte model (only medians and speedups are reported)."""
    benchmark.extra_info.update(impl=impl, bytes=nbytes, fused=fused)
    if nbytes:
        benchmark.extra_info.update(copy_GBps=round(copy_bandwidth(tensor_bytes), 1),
                                    copy_GBps_dram=round(copy_bandwidth(DRAM_BYTES), 1))


# Extra summary tables a benchmark file registers: each takes {group: [(median s,
# extra_info)]} (annotated as below) and returns markdown lines (none: nothing to print).
SUMMARIES: list = []


def _annotate(items):
    """items: (group, median seconds, extra_info) triples. Adds GB/s, fractions of the copy
    bandwidths, and the fused kernel's speedup against each baseline of its group."""
    groups: dict[str, list] = {}
    for group, med, info in items:
        if info.get("impl"):
            groups.setdefault(group, []).append((med, info))
    for entries in groups.values():
        fused = [med for med, info in entries if info["fused"]]
        for med, info in entries:
            if info.get("bytes"):  # no byte model (e.g. a whole attack): no GB/s
                info["GBps"] = round(info["bytes"] / med / 1e9, 1)
                info["frac_of_copy"] = round(info["GBps"] / info["copy_GBps"], 2)
                info["frac_of_dram_copy"] = round(info["GBps"] / info["copy_GBps_dram"], 2)
            if fused and not info["fused"]:
                info["fused_speedup"] = round(med / fused[0], 2)
        for med, info in entries:
            if info["fused"]:
                info["speedup_vs"] = {i["impl"]: i["fused_speedup"] for _, i in entries
                                      if "fused_speedup" in i}
    return groups


def pytest_benchmark_update_json(config, benchmarks, output_json):
    _annotate([(b["group"], b["stats"]["median"], b["extra_info"])
               for b in output_json["benchmarks"]])


def _rows(session):
    groups = _annotate([(b.group, b.stats.median, b.extra_info)
                        for b in session.benchmarks if b.stats])
    lines = []
    for group, entries in groups.items():
        for med, info in sorted(entries, key=lambda e: e[0]):
            speed = f"{info['fused_speedup']}x" if "fused_speedup" in info else ""
            lines.append(f"| {group} | {info['impl']} | {med * 1e3:.3f} | "
                         f"{info.get('GBps', '-')} | {info.get('frac_of_copy', '-')} | "
                         f"{info.get('frac_of_dram_copy', '-')} | {speed} |")
    return lines


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    rows = _rows(session)
    if not rows:
        return
    head = [f"fastrobust benchmarks, {datetime.date.today()}, {_cpu_name()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}; copy bandwidth "
            f"{copy_bandwidth(DRAM_BYTES):.0f} GB/s at 256 MB; {MALLOC}; {PAGES}",
            "",
            "| group | implementation | median ms | GB/s (byte model) | of same-size copy | "
            "of 256 MB copy | fused is faster by |",
            "|---|---|---|---|---|---|---|"]
    for summary in SUMMARIES:  # the files' own tables, from the same medians
        head_rows = summary(_annotate([(b.group, b.stats.median, b.extra_info)
                                       for b in session.benchmarks if b.stats]))
        if head_rows:
            rows = rows + [""] + head_rows
    text = "\n".join(head + rows)
    terminalreporter.write_line("")
    terminalreporter.write_line(text)
    out = os.environ.get("BENCH_RESULTS")
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture(scope="session", autouse=True)
def _warm_allocator():
    """glibc serves large allocations with fresh mmap'd pages (page faults on every use) until a
    freed chunk raises its threshold, at most to 32 MB. Raise it once up front, so results do
    not depend on which benchmark happens to run first; tensors of 32 MB and more still take
    page faults, for every implementation alike."""
    t = torch.empty(32 * 2**20 // 4).fill_(0)
    del t


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
