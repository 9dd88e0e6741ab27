"""Per-op GPU figures: fastrobust beside the eager forms users run today, three figures each.

    python benchmarks/gpu_ops.py [--json PATH] [--compile] [--kernel-time graph|profiler]
    python benchmarks/gpu_ops.py --device cpu --smoke      # tiny sizes, every code path once

What is measured, for every implementation of every case (a "group"):

  wall µs/call   median over `--rounds` rounds of R = `--calls` pipelined calls, the device
                 synchronized at the end of each round, divided by R: what a user's loop feels.
  GPU µs/call    the device's own time: R calls captured in one torch.cuda.CUDAGraph, replays
                 timed with CUDA events, divided by R ("graph": launch gaps gone, kernels
                 back to back). If capture fails (an op that syncs or cannot be captured), the
                 kernels' summed durations under torch.profiler over R eager calls
                 ("profiler"); the capture error is kept in the JSON. On the CPU (smoke) the
                 profiler's summed CPU op time stands in ("profiler-cpu").
  host µs/call   the time to issue R_host = `--host-calls` calls without synchronizing, divided
                 by R_host (R_host small, so the launch queue never fills and the host never
                 waits for the device); the tiny-shape group also gives the host time of one
                 call issued on an idle device ("host µs, 1 call"): pure per-call overhead.

Cases (N C H W, fp32 NCHW unless said; K=2 is OAT's clean half + adversarial half):
  bn_train      routed BN forward+backward, training, 256×64×32×32: fastrobust
                multi_batch_norm (default dispatch, and the "cuda" backend when available),
                the OAT repository's dual BN (slice, two nn.BatchNorm2d, cat), one F.batch_norm
                over the whole batch (cuDNN/native: the floor, no routing), and with --compile
                torch.compile of the OAT dual BN.
  bn_eval       the same, eval mode, forward only under no_grad (as inside an attack).
  bn_tiny       one training BN forward at 8×16×8×8 (host overhead): functional and module
                forms against F.batch_norm / nn.BatchNorm2d, and x.add_(0) as the cost of a
                trivial torch op.
  bn_film_relu  BN → FiLM → ReLU forward+backward, 256×64×32×32: the fused op (film_gamma,
                film_beta, activation="relu") against the three eager modules (one BN) and
                the OAT dual BN → FiLM → ReLU.
  bn_bf16_cl    bf16 channels_last BN forward+backward, 256×256×8×8, fp32 parameters.
  mixed_eval / mixed_train   mixed BN K=2, 256×64×16×16 (eval forward; training
                forward+backward) against two nn.BatchNorm2d over the batch and the weighted sum.
  pgd_*         pgd_step_ linf at 256×3×224×224, l2 at that size and at N=8, mifgsm_step_ at
                256×3×224×224, against torchattacks' updates in eager PyTorch (baselines.py);
                with --compile also torch.compile of them.

Byte model (ideal traffic, what GB/s is computed from, with the GPU time when there is one):
  BN forward 2·|x| (read x, write y); forward+backward 5·|x| (plus read x, dy, write dx);
  the [N, C] FiLM / [N, K] mix tensors are left out. linf and l2 steps 4·|x| (read x_adv,
  grad, x_nat, write x_adv: 16 B/element in fp32), MI-FGSM 6·|x| (24 B/element, plus the
  momentum buffer read and write). "of copy" divides by the bandwidth of a device copy of one
  256×3×224×224 fp32 tensor (read + write counted), measured once per run; the l2 step at N=8
  (4.8 MB) fits in the H200's L2 cache, so its fraction can pass 1.

"fastrobust faster: wall / GPU / host" is each figure of the row over fastrobust's (default
dispatch) in the same group: above 1, fastrobust is faster. The first --warmup calls of each
row are untimed (they JIT-compile the Triton kernels; their seconds are in the JSON).
Output: a markdown table on stdout (progress on stderr) and, with --json, every figure. Runs
in about a minute on an H200 (Triton compiles included; --compile adds about a minute). No
figure is asserted: tests/test_gpu_scripts.py runs --smoke on the CPU and checks the rows.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402
from torch import nn  # noqa: E402

from fastrobust import backends  # noqa: E402
from fastrobust import functional as F  # noqa: E402
from fastrobust.nn import DualBatchNorm2d  # noqa: E402
from baselines import (eager_bn_film_relu, eager_film, eager_mixed_bn, oat_dual_bn,  # noqa: E402
                       torchattacks_l2_step, torchattacks_mifgsm_step, torchattacks_step)

EPS, ALPHA = 8 / 255, 2 / 255          # linf steps and MI-FGSM
L2_EPS, L2_ALPHA = 0.5, 0.1            # l2 steps


def log(msg: str) -> None:
    print(f"[gpu_ops {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


class Meter:
    """The three figures of one callable (see the module docstring)."""

    def __init__(self, device: torch.device, a):
        self.device, self.cuda = device, device.type == "cuda"
        self.R, self.rounds, self.host_R = a.calls, a.rounds, a.host_calls
        self.replays, self.one_reps, self.warmup = a.replays, a.one_call_reps, a.warmup
        self.kernel_mode = a.kernel_time

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _per_call(self, fn, calls: int, rounds: int, wait: bool) -> float:
        """Median over `rounds` of the seconds per call of `calls` back-to-back calls, from
        an idle device; the clock stops after the device finishes when `wait`, else as soon
        as the last call has been issued."""
        times = []
        for _ in range(rounds):
            self.sync()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            if wait:
                self.sync()
            times.append((time.perf_counter() - t) / calls)
        self.sync()
        return statistics.median(times)

    def wall(self, fn) -> float:
        return self._per_call(fn, self.R, self.rounds, wait=True)

    def host(self, fn) -> float:
        return self._per_call(fn, self.host_R, self.rounds, wait=False)

    def host_one(self, fn) -> float:
        return self._per_call(fn, 1, self.one_reps, wait=False)

    def kernel(self, fn) -> tuple[float | None, str, str | None]:
        """(seconds per call, method, why the graph was not used)."""
        why = None
        if self.cuda and self.kernel_mode == "graph":
            try:
                return self._graph(fn), "graph", None
            except Exception as e:  # e.g. an op that syncs, or one that cannot be captured
                why = f"capture failed: {short(e)}"
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(self.device)
        try:
            return self._profiled(fn), ("profiler" if self.cuda else "profiler-cpu"), why
        except Exception as e:
            return None, "failed", f"{why + '; ' if why else ''}profiler failed: {short(e)}"

    def _graph(self, fn) -> float:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.R):
                fn()
        graph.replay()
        self.sync()
        times = []
        for _ in range(self.replays):
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / self.R)
        del graph
        return statistics.median(times)

    def _profiled(self, fn) -> float:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        fn()
        self.sync()
        with profile(activities=acts) as prof:
            for _ in range(self.R):
                fn()
            self.sync()
        if self.cuda:  # every kernel, memcpy and memset the device ran
            us = sum(e.time_range.elapsed_us() for e in prof.events()
                     if e.device_type == DeviceType.CUDA)
        else:
            us = sum(e.self_cpu_time_total for e in prof.events()
                     if e.device_type == DeviceType.CPU and not e.is_async)
        return us / 1e6 / self.R


# --- the cases ------------------------------------------------------------------------------

def shapes(smoke: bool) -> dict:
    if smoke:
        return dict(bn=(16, 8, 8, 8), tiny=(8, 16, 8, 8), bf16=(16, 16, 4, 4),
                    mixed=(16, 8, 8, 8), pgd=(4, 3, 16, 16), pgd_small=(2, 3, 16, 16))
    return dict(bn=(256, 64, 32, 32), tiny=(8, 16, 8, 8), bf16=(256, 256, 8, 8),
                mixed=(256, 64, 16, 16), pgd=(256, 3, 224, 224), pgd_small=(8, 3, 224, 224))


def cuda_backend_reason(device, family: str) -> str | None:
    """Why the CUDA C++ backend cannot be timed here (None: it can)."""
    if device.type != "cuda":
        return "CUDA device only"
    return "; ".join(backends.not_supported_reasons("cuda", family, device)) or None


def dims(shape) -> str:
    return "×".join(map(str, shape))


class Group:
    """One case: a title, the byte model, and its implementations, fastrobust's first.
    Each implementation is (name, make, backend forced or None, skip reason or None);
    `make()` allocates its tensors and returns the zero-argument callable that is timed."""

    def __init__(self, key, title, nbytes, one_call=False):
        self.key, self.title, self.nbytes, self.one_call = key, title, nbytes, one_call
        self.impls = []

    def add(self, name, make, backend=None, skip=None):
        self.impls.append((name, make, backend, skip))


def _halves(N, dev):
    return torch.cat([torch.zeros(N // 2), torch.ones(N - N // 2)]).long().to(dev)


def _params(K, C, dev, grad=True):
    w = torch.ones(K, C, device=dev, requires_grad=grad)
    b = torch.zeros(K, C, device=dev, requires_grad=grad)
    return w, b, torch.zeros(K, C, device=dev), torch.ones(K, C, device=dev)


def _x(shape, dev, dtype=torch.float32, cl=False, grad=False):
    x = torch.randn(shape, device=dev).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def _callable(forward, leaves=None, like=None):
    """With `leaves`: forward+backward (their gradients for a fixed random dy shaped like
    `like`); without: the forward under no_grad."""
    if leaves:
        gy = torch.randn_like(like)
        return lambda: torch.autograd.grad(forward(), leaves, gy)

    def fn():
        with torch.no_grad():
            return forward()
    return fn


def bn_group(key, title, shape, dev, args, *, training, dtype=torch.float32, cl=False,
             film=False):
    """Routed BN (K=2 halves) against the OAT dual BN, F.batch_norm and the options."""
    N, C = shape[:2]
    elem = torch.finfo(dtype).bits // 8
    nbytes = (5 if training else 2) * N * C * shape[2] * shape[3] * elem
    g = Group(key, title, nbytes)
    branch, n_clean = _halves(N, dev), N // 2

    def film_args():
        return (torch.randn(N, C, device=dev).to(dtype).requires_grad_(),
                torch.randn(N, C, device=dev).to(dtype).requires_grad_())

    def fused():
        x = _x(shape, dev, dtype, cl, grad=training)
        w, b, rm, rv = _params(2, C, dev)
        nbt = torch.zeros(2, dtype=torch.long, device=dev)
        kw, leaves = {}, [x, w, b]
        if film:
            gam, bet = film_args()
            kw = dict(film_gamma=gam, film_beta=bet, activation="relu")
            leaves += [gam, bet]

        def forward():
            return F.multi_batch_norm(x, branch, w, b, rm, rv, training=training,
                                      num_batches_tracked=nbt, **kw)
        return _callable(forward, training and leaves, x)

    def dual(compiled=False):
        def make():
            x = _x(shape, dev, dtype, cl, grad=training)
            bn0, bn1 = (nn.BatchNorm2d(C).to(dev).train(training) for _ in range(2))
            dual_fn = torch.compile(oat_dual_bn) if compiled else oat_dual_bn
            leaves = [x, bn0.weight, bn0.bias, bn1.weight, bn1.bias]
            if film:
                gam, bet = film_args()
                leaves += [gam, bet]

                def forward():
                    return torch.relu(eager_film(dual_fn(x, n_clean, bn0, bn1), gam, bet))
            else:
                def forward():
                    return dual_fn(x, n_clean, bn0, bn1)
            return _callable(forward, training and leaves, x)
        return make

    def whole():
        x = _x(shape, dev, dtype, cl, grad=training)
        if film:  # the three eager modules: BN, FiLM, ReLU
            bn = nn.BatchNorm2d(C).to(dev).train()
            gam, bet = film_args()
            return _callable(lambda: eager_bn_film_relu(x, bn, gam, bet),
                             [x, bn.weight, bn.bias, gam, bet], x)
        w = torch.ones(C, device=dev, requires_grad=True)
        b = torch.zeros(C, device=dev, requires_grad=True)
        rm, rv = torch.zeros(C, device=dev), torch.ones(C, device=dev)

        def forward():
            return TF.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
        return _callable(forward, training and [x, w, b], x)

    g.add("fastrobust", fused)
    g.add("fastrobust[cuda]", fused, "cuda", cuda_backend_reason(dev, "multi_bn"))
    if film:
        g.add("eager BN+FiLM+ReLU (3 modules)", whole)
        g.add("OAT dual BN+FiLM+ReLU", dual())
    else:
        g.add("OAT dual BN (slice, 2 BN, cat)", dual())
        g.add("F.batch_norm whole batch (floor)", whole)
        g.add("torch.compile(OAT dual BN)", dual(True), skip=None if args.compile else
              "needs --compile")
    return g


def tiny_group(shape, dev):
    N, C = shape[:2]
    g = Group("bn_tiny", f"BN train fwd {dims(shape)} (host overhead)", 2 * N * C *
              shape[2] * shape[3] * 4, one_call=True)
    branch = _halves(N, dev)

    def fused():
        x = _x(shape, dev)
        w, b, rm, rv = _params(2, C, dev)
        nbt = torch.zeros(2, dtype=torch.long, device=dev)
        return _callable(lambda: F.multi_batch_norm(x, branch, w, b, rm, rv, training=True,
                                                      num_batches_tracked=nbt))

    def torch_bn():
        x = _x(shape, dev)
        w, b, rm, rv = (t[0] for t in _params(1, C, dev, grad=False))
        return _callable(lambda: TF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))

    def fused_module():
        x, bn = _x(shape, dev), DualBatchNorm2d(C).to(dev).train()
        return _callable(lambda: bn(x, branch=branch))

    def torch_module():
        x, bn = _x(shape, dev), nn.BatchNorm2d(C).to(dev).train()
        return _callable(lambda: bn(x))

    def add0():
        x = _x(shape, dev)
        return _callable(lambda: x.add_(0))

    g.add("fastrobust multi_batch_norm", fused)
    g.add("F.batch_norm", torch_bn)
    g.add("fastrobust DualBatchNorm2d module", fused_module)
    g.add("nn.BatchNorm2d module", torch_module)
    g.add("x.add_(0) (trivial op)", add0)
    return g


def mixed_group(shape, dev, *, training):
    N, C = shape[:2]
    n_el = N * C * shape[2] * shape[3]
    mode = "train fwd+bwd" if training else "eval fwd"
    g = Group("mixed_train" if training else "mixed_eval", f"mixed BN K=2 {mode} {dims(shape)}",
              (5 if training else 2) * n_el * 4)

    def inputs():
        x = _x(shape, dev, grad=training)
        mix = torch.softmax(torch.randn(N, 2, device=dev), 1).requires_grad_(training)
        return x, mix

    def fused():
        x, mix = inputs()
        w, b, rm, rv = _params(2, C, dev)

        def forward():
            return F.mixed_batch_norm(x, mix, w, b, rm, rv, training=training)
        return _callable(forward, training and [x, mix, w, b], x)

    def eager():
        x, mix = inputs()
        bns = nn.ModuleList(nn.BatchNorm2d(C) for _ in range(2)).to(dev).train(training)

        def forward():
            return eager_mixed_bn(x, mix, bns)
        return _callable(forward, training and [x, mix, *bns.parameters()], x)

    g.add("fastrobust", fused)
    g.add("fastrobust[cuda]", fused, "cuda", cuda_backend_reason(dev, "multi_bn"))
    g.add("2 nn.BatchNorm2d + weighted sum", eager)
    return g


def pgd_group(kind, shape, dev, args):
    n_el = shape[0] * shape[1] * shape[2] * shape[3]
    per_elem = 24 if kind == "mifgsm" else 16
    g = Group(f"pgd_{kind}_{shape[0]}", f"{kind} step {dims(shape)} fp32", n_el * per_elem)

    def tensors():
        x = torch.rand(shape, device=dev)
        adv = (x + EPS * (2 * torch.rand(shape, device=dev) - 1)).clamp(0, 1)
        return x, adv, torch.randn(shape, device=dev), torch.zeros(shape, device=dev)

    def make(step):
        def build():
            x, adv, grad, mom = tensors()
            if kind == "mifgsm":
                return lambda: step(adv, grad, mom, x, EPS, ALPHA)
            eps, alpha = (L2_EPS, L2_ALPHA) if kind == "l2" else (EPS, ALPHA)
            return lambda: step(adv, grad, x, eps, alpha)
        return build

    ours = {"linf": F.pgd_step_, "l2": functools.partial(F.pgd_step_, norm="l2"),
            "mifgsm": F.mifgsm_step_}[kind]
    eager = {"linf": torchattacks_step, "l2": torchattacks_l2_step,
             "mifgsm": torchattacks_mifgsm_step}[kind]
    fused = make(ours)
    g.add("fastrobust", fused)
    g.add("fastrobust[cuda]", fused, "cuda", cuda_backend_reason(dev, "pgd"))
    g.add("torchattacks step (eager)", make(eager))
    g.add("torch.compile(torchattacks step)", lambda: make(torch.compile(eager))(),
          skip=None if args.compile else "needs --compile")
    return g


def build_groups(dev, args) -> list[Group]:
    s = shapes(args.smoke)
    return [
        bn_group("bn_train", f"routed BN K=2 train fwd+bwd {dims(s['bn'])} fp32", s["bn"], dev,
                 args, training=True),
        bn_group("bn_eval", f"routed BN K=2 eval fwd {dims(s['bn'])} fp32", s["bn"], dev, args,
                 training=False),
        tiny_group(s["tiny"], dev),
        bn_group("bn_film_relu", f"BN+FiLM+ReLU K=2 train fwd+bwd {dims(s['bn'])} fp32",
                 s["bn"], dev, args, training=True, film=True),
        bn_group("bn_bf16_cl", f"routed BN K=2 train fwd+bwd {dims(s['bf16'])} bf16 "
                 "channels_last", s["bf16"], dev, args, training=True, dtype=torch.bfloat16,
                 cl=True),
        mixed_group(s["mixed"], dev, training=False),
        mixed_group(s["mixed"], dev, training=True),
        pgd_group("linf", s["pgd"], dev, args),
        pgd_group("l2", s["pgd"], dev, args),
        pgd_group("l2", s["pgd_small"], dev, args),
        pgd_group("mifgsm", s["pgd"], dev, args),
    ]


# --- running and reporting ------------------------------------------------------------------

def run_impl(meter: Meter, group: Group, name, make, backend, skip) -> dict:
    row = {"group": group.title, "key": group.key, "impl": name, "bytes": group.nbytes}
    if skip:
        row.update(skipped=skip, seconds=0.0)
        return row
    t0 = time.perf_counter()
    fn = None
    try:
        with backends.use(backend) if backend else contextlib.nullcontext():
            fn = make()
            for _ in range(meter.warmup):  # compiles Triton kernels / torch.compile
                fn()
            meter.sync()
            row["first_calls_s"] = round(time.perf_counter() - t0, 2)
            row["wall_us"] = meter.wall(fn) * 1e6
            row["host_us"] = meter.host(fn) * 1e6
            if group.one_call:
                row["host_one_call_us"] = meter.host_one(fn) * 1e6
            k, method, why = meter.kernel(fn)
            row["gpu_method"] = method
            if k is not None:
                row["gpu_us"] = k * 1e6
            if why:
                row["gpu_note"] = why
    except Exception as e:
        row["error"] = short(e)
        with contextlib.suppress(Exception):
            meter.sync()
    del fn
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def annotate(rows: list[dict], copy_gbps: float | None) -> None:
    """GB/s from the byte model, fraction of the copy, and fastrobust's speed-up over each
    baseline of its group (baseline figure / fastrobust's), for wall, GPU and host."""
    ref = {}
    for r in rows:
        if r["impl"].startswith("fastrobust") and "wall_us" in r:
            ref.setdefault(r["key"], r)
    for r in rows:
        t = r.get("gpu_us") or r.get("wall_us")
        if t and r["bytes"]:
            r["GBps"] = r["bytes"] / (t * 1e-6) / 1e9
            if copy_gbps:
                r["of_copy"] = r["GBps"] / copy_gbps
        base = ref.get(r["key"])
        if base is not None and base is not r and "wall_us" in r:
            r["speedup"] = {m: r[m] / base[m] for m in ("wall_us", "gpu_us", "host_us")
                            if r.get(m) and base.get(m)}


def fmt(v, digits=1):
    return "" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict]) -> str:
    head = ("| group | implementation | wall µs | GPU µs | GPU via | host µs | host µs, 1 call | "
            "GB/s | of copy | fastrobust faster: wall / GPU / host |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "wall_us" not in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| {r['group']} | {r['impl']} | {'skipped' if 'skipped' in r else 'ERROR'}"
                         f": {why} | | | | | | | |")
            continue
        sp = r.get("speedup", {})
        speed = " / ".join(f"{sp[m]:.2f}x" if m in sp else "-"
                           for m in ("wall_us", "gpu_us", "host_us")) if sp else ""
        via = r.get("gpu_method", "")
        if r.get("gpu_note"):
            via += " (capture failed)" if via == "profiler" else ""
        lines.append(f"| {r['group']} | {r['impl']} | {fmt(r['wall_us'])} | "
                     f"{fmt(r.get('gpu_us'))} | {via} | {fmt(r['host_us'])} | "
                     f"{fmt(r.get('host_one_call_us'))} | {fmt(r.get('GBps'))} | "
                     f"{fmt(r.get('of_copy'), 2)} | {speed} |")
    return "\n".join(lines)


def host_summary(rows: list[dict]) -> str:
    """The host-overhead pairs of the tiny group (DESIGN §4: fastrobust's host time per BN
    forward at most 1.5× F.batch_norm's)."""
    tiny = {r["impl"]: r for r in rows if r["key"] == "bn_tiny" and "host_us" in r}
    out = []
    for ours, theirs in (("fastrobust multi_batch_norm", "F.batch_norm"),
                         ("fastrobust DualBatchNorm2d module", "nn.BatchNorm2d module")):
        if ours in tiny and theirs in tiny:
            a, b = tiny[ours], tiny[theirs]
            out.append(f"host per BN forward, {ours} / {theirs}: pipelined "
                       f"{a['host_us']:.1f} / {b['host_us']:.1f} µs = "
                       f"{a['host_us'] / b['host_us']:.2f}x; one call "
                       f"{a['host_one_call_us']:.1f} / {b['host_one_call_us']:.1f} µs = "
                       f"{a['host_one_call_us'] / b['host_one_call_us']:.2f}x")
    return "\n".join(out)


def environment(dev) -> dict:
    import triton
    env = {"torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "device": str(dev),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
    for fam in ("multi_bn", "pgd"):
        try:
            env[f"backend_{fam}"] = backends.choose(fam, dev)
        except Exception as e:
            env[f"backend_{fam}"] = short(e)
    env["cuda_backend"] = cuda_backend_reason(dev, "multi_bn") or "available"
    return env


def copy_bandwidth(meter: Meter, shape, dev) -> float:
    """GB/s of dst.copy_(src), one fp32 tensor of `shape` (read + write), pipelined copies."""
    src = torch.rand(shape, device=dev)
    dst = torch.empty_like(src).copy_(src)
    return 2 * src.numel() * 4 / meter.wall(lambda: dst.copy_(src)) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 calls, 2 rounds")
    ap.add_argument("--compile", action="store_true",
                    help="add torch.compile baselines (about +60 s)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--only", default="", help="comma-separated group keys (e.g. bn_train)")
    ap.add_argument("--kernel-time", choices=("graph", "profiler"), default="graph")
    counts = (("calls", 20, 2, "R: pipelined calls per round"), ("rounds", 10, 2, "rounds"),
              ("host_calls", 8, 2, "R_host: calls issued per host round"),
              ("replays", 10, 2, "timed graph replays"),
              ("one_call_reps", 200, 3, "one-call host measurements"),
              ("warmup", 3, 1, "untimed calls first"))
    for name, full, smoke, what in counts:
        ap.add_argument("--" + name.replace("_", "-"), type=int, help=f"{what} ({full})")
    a = ap.parse_args(argv)
    small = a.smoke
    for name, full, smoke, _ in counts:
        if getattr(a, name) is None:
            setattr(a, name, smoke if small else full)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    meter = Meter(dev, a)
    env = environment(dev)
    log(f"{env}")
    copy_gbps = copy_bandwidth(meter, shapes(small)["pgd"], dev)
    log(f"copy bandwidth {copy_gbps:.0f} GB/s at {dims(shapes(small)['pgd'])} fp32")
    only = {k for k in a.only.split(",") if k}
    rows = []
    for group in build_groups(dev, a):
        if only and group.key not in only:
            continue
        for name, make, backend, skip in group.impls:
            row = run_impl(meter, group, name, make, backend, skip)
            rows.append(row)
            if "wall_us" in row:
                state = (f"wall {row['wall_us']:.1f} µs, GPU {fmt(row.get('gpu_us'))} µs "
                         f"({row.get('gpu_method')}), host {row['host_us']:.1f} µs")
            else:
                state = f"skipped ({row['skipped']})" if "skipped" in row else row["error"]
            first = f", first calls {row['first_calls_s']} s" if "first_calls_s" in row else ""
            log(f"{group.key} | {name}: {state} [{row['seconds']} s{first}]")
        annotate(rows, copy_gbps)
        if a.json:
            write_json(a.json, env, copy_gbps, rows, t_start)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    annotate(rows, copy_gbps)
    total = time.perf_counter() - t_start
    title = env.get("gpu", platform.processor() or "cpu")
    print(f"fastrobust gpu_ops — {title}, torch {env['torch']}, triton {env['triton']}, "
          f"multi_bn backend {env['backend_multi_bn']}, cuda backend: {env['cuda_backend']}; "
          f"copy {copy_gbps:.0f} GB/s; R={a.calls}, rounds={a.rounds}, host R={a.host_calls}"
          f"{', SMOKE' if small else ''}\n")
    print(table(rows))
    summary = host_summary(rows)
    if summary:
        print("\n" + summary)
    print(f"\ntotal {total:.1f} s")
    if a.json:
        write_json(a.json, env, copy_gbps, rows, t_start)
    return 0


def write_json(path, env, copy_gbps, rows, t_start) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "copy_GBps": copy_gbps, "rows": rows,
                   "seconds": round(time.perf_counter() - t_start, 1)}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
