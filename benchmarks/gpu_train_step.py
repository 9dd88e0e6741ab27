"""The adversarial training step users feel, end to end, on a GPU: fastrobust against the forms
users run today.

    python benchmarks/gpu_train_step.py [--arch resnet18|resnet34] [--bf16] [--compile]
                                        [--json PATH]
    python benchmarks/gpu_train_step.py --device cpu --smoke    # width 4, batch 8, PGD-1

Model: CIFAR-form ResNet (fastrobust.models.resnet: 3×3 stem, four stages, 10 classes,
32×32 inputs), width 64. Batch 256 = 128 clean + 128 adversarial samples (random inputs and
labels: speed does not depend on the data). Attack: PGD-7, linf, ε 8/255, α 2/255, random
start, the model in eval mode with frozen parameters, on the adversarial half only. One step
= the attack + one training forward/backward over the 256 samples + SGD (momentum 0.9).

Rows, full step:
  plain       one nn.BatchNorm2d per layer (cuDNN), torchattacks' PGD loop
              (benchmarks/baselines.py) on the adversarial half, one forward/backward on the
              256 batch: what adversarial training costs with a single BN.
  oat         the OAT repository's form: every BN a dual BN (slice, bn_clean / bn_adv, cat;
              a batch of one kind through its BN alone); the attack through bn_adv with the
              OAT repository's PGD (summed CE, sign step, boolean-mask projection: a host sync
              per step); then the training forward with the clean half first.
  oat_ta      the same model attacked by torchattacks' loop (isolates the BN's share from the
              attack loop's).
  fastrobust  convert_multi_bn(model, 2); fastrobust.attacks.PGD(..., steps=7) with
              branch=1 for the attack; `routing(model, branch=[0]*128 + [1]*128)` for the
              training forward.
  fastrobust_graph   the same with PGD(cuda_graph=True) (one step captured, replayed; CUDA only).
Rows, training forward+backward only (no attack, no optimizer step): fb_plain, fb_oat,
fb_fastrobust; with --compile also torch.compile(model, mode="reduce-overhead") of the OAT
dual-BN model and of the fastrobust model (fb_compiled_*; a compile failure is reported in the
table, not raised).

Each row runs in fp32 (TF32 convolutions, torch's default), and with --bf16 also under bf16
autocast with the model and inputs in channels_last. Reported: median (and min) ms per step
over --rounds steps after --warmup untimed steps (their seconds are shown: the first steps
JIT-compile the Triton kernels and pick cuDNN algorithms); "speed-up" = the OAT row's median
over this row's (full steps against `oat`, forward+backward rows against `fb_oat`). GPU busy:
after all rows are timed, one more step of each under torch.profiler; the union of its kernel
intervals over the row's median step time (1.0: the GPU never waits for the host; "-" on CPU
or if the profiler fails; --no-busy skips it). Before timing, the OAT dual-BN model and the
fastrobust model are checked to give the same training loss on the same weights and batch.
Progress goes to stderr, the table to stdout, every figure to --json (rewritten after each
row). Default run: about 1.5 minutes on an H200, most of it the first steps (Triton JIT
compiles, cuDNN autotuning; torch.backends.cudnn.benchmark is on unless
--no-cudnn-benchmark); --bf16 adds about a minute, --compile a few minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
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
from fastrobust.attacks import PGD  # noqa: E402
from fastrobust.models.resnet import ResNet  # noqa: E402
from fastrobust.nn import convert_multi_bn, routing  # noqa: E402
from baselines import attacking, oat_pgd, torchattacks_pgd  # noqa: E402

ARCHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
EPS, ALPHA = 8 / 255, 2 / 255

ROWS = [  # key, table label, group ("step": full step; "fb": forward+backward only)
    ("plain", "plain BN + torchattacks PGD", "step"),
    ("oat", "OAT repo: dual BN (slice/2 BN/cat) + OAT PGD", "step"),
    ("oat_ta", "OAT dual BN + torchattacks PGD", "step"),
    ("fastrobust", "fastrobust: convert_multi_bn + routing + PGD", "step"),
    ("fastrobust_graph", "fastrobust + PGD(cuda_graph=True)", "step"),
    ("fb_plain", "fwd+bwd only: plain BN", "fb"),
    ("fb_oat", "fwd+bwd only: OAT dual BN", "fb"),
    ("fb_fastrobust", "fwd+bwd only: fastrobust", "fb"),
    ("fb_compiled_oat", "fwd+bwd only: torch.compile(reduce-overhead) OAT dual BN", "fb"),
    ("fb_compiled_fastrobust", "fwd+bwd only: torch.compile(reduce-overhead) fastrobust", "fb"),
]
REFERENCE = {"step": "oat", "fb": "fb_oat"}


def log(msg: str) -> None:
    print(f"[gpu_train_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


class OATDualBN(nn.Module):
    """The OAT repository's dual BN: the batch is sorted clean-first, the first `n_clean`
    samples go through bn_clean and the rest through bn_adv (slice, two BNs, cat); a batch of
    one kind goes through its BN alone."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bn_clean, self.bn_adv = copy.deepcopy(bn), copy.deepcopy(bn)
        self.n_clean = 0

    def forward(self, x):
        n = self.n_clean
        if n <= 0:
            return self.bn_adv(x)
        if n >= x.shape[0]:
            return self.bn_clean(x)
        return torch.cat([self.bn_clean(x[:n]), self.bn_adv(x[n:])])


def to_oat_dual(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, OATDualBN(child))
        else:
            to_oat_dual(child)
    return module


def set_n_clean(model: nn.Module, n: int) -> None:
    for m in model.modules():
        if isinstance(m, OATDualBN):
            m.n_clean = n


class Setup:
    """The shared initial model and batch, and how a row builds its own copy of them for one
    precision (fp32, or bf16 autocast + channels_last)."""

    def __init__(self, a, dev):
        self.a, self.dev = a, dev
        torch.manual_seed(0)
        self.base = ResNet(ARCHS[a.arch], a.width, 10).to(dev).train()
        self.x = torch.rand(a.batch, 3, 32, 32, device=dev)
        self.y = torch.randint(0, 10, (a.batch,), device=dev)
        self.n_clean = a.batch // 2
        self.branch = torch.cat([torch.zeros(self.n_clean), torch.ones(a.batch - self.n_clean)]
                                ).long().to(dev)

    def model(self, kind: str, bf16: bool) -> nn.Module:
        m = copy.deepcopy(self.base)
        if kind == "oat":
            m = to_oat_dual(m)
        elif kind == "fastrobust":
            m = convert_multi_bn(m, 2)
        m = m.to(self.dev).train()
        return m.to(memory_format=torch.channels_last) if bf16 else m

    def batch(self, bf16: bool):
        x = self.x.contiguous(memory_format=torch.channels_last) if bf16 else self.x
        nc = self.n_clean
        return x[:nc], x[nc:], self.y[nc:], x, self.y

    def autocast(self, bf16: bool):
        if not bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.dev.type, dtype=torch.bfloat16)

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def build(key: str, s: Setup, bf16: bool):
    """The zero-argument step of row `key` (raises if the row cannot run here)."""
    steps = s.a.steps
    xc, xa, ya, xall, yall = s.batch(bf16)
    kind = ("oat" if "oat" in key else "fastrobust" if "fastrobust" in key else "plain")
    model = s.model(kind, bf16)
    amp = lambda: s.autocast(bf16)  # noqa: E731

    if key.startswith("fb_"):  # training forward + backward only
        fwd = model
        if "compiled" in key:
            fwd = torch.compile(model, mode="reduce-overhead")
        if kind == "oat":
            set_n_clean(model, s.n_clean)
        route = (lambda: routing(model, branch=s.branch)) if kind == "fastrobust" else \
            contextlib.nullcontext

        def fb_step():
            if "compiled" in key:
                torch.compiler.cudagraph_mark_step_begin()
            with amp(), route():
                loss = TF.cross_entropy(fwd(xall), yall)
            model.zero_grad(set_to_none=True)
            loss.backward()
            return loss
        return fb_step

    opt = s.optimizer(model)
    if key == "fastrobust_graph":
        if "cuda_graph" not in inspect.signature(PGD).parameters:
            raise RuntimeError("this fastrobust's PGD has no cuda_graph option")
        if s.dev.type != "cuda":
            raise RuntimeError("skipped: cuda_graph=True needs a CUDA device")
    atk = None
    if kind == "fastrobust":
        atk = PGD(model, EPS, ALPHA, steps, **({"cuda_graph": True} if key.endswith("graph")
                                               else {}))

    def attack():
        if kind == "fastrobust":
            return atk(xa, ya, branch=1)
        if kind == "oat":
            set_n_clean(model, 0)  # the whole adversarial half through bn_adv
        with attacking(model):
            if key == "oat":
                start = torch.clamp(xa + torch.empty_like(xa).uniform_(-EPS, EPS), 0, 1)
                adv = oat_pgd(model, xa, ya, EPS, ALPHA, steps, start)
            else:
                adv = torchattacks_pgd(model, xa, ya, EPS, ALPHA, steps)
        if kind == "oat":
            set_n_clean(model, s.n_clean)
        return adv

    def step():
        with amp():
            adv = attack()
            batch = torch.cat([xc, adv])
            if kind == "fastrobust":
                with routing(model, branch=s.branch):
                    logits = model(batch)
            else:
                logits = model(batch)
            loss = TF.cross_entropy(logits, yall)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_row(step, dev, warmup: int, rounds: int) -> dict:
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(dev)
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        sync(dev)
        t = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
            "warmup_s": round(first, 2), "times_ms": [round(t * 1e3, 3) for t in times]}


def gpu_busy_ms(step, dev) -> float:
    """Milliseconds of one step during which at least one kernel (or copy) ran on the GPU:
    the union of the device intervals torch.profiler records."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync(dev)
    return union_length([(e.time_range.start, e.time_range.end) for e in prof.events()
                         if e.device_type == DeviceType.CUDA]) / 1e3


def union_length(spans) -> float:
    """Total length covered by the (start, end) intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def check_same_loss(s: Setup) -> float:
    """|loss of the OAT dual-BN model - loss of the fastrobust model|, same weights and
    batch, one training forward in fp32."""
    oat, fr = s.model("oat", False), s.model("fastrobust", False)
    set_n_clean(oat, s.n_clean)
    with torch.no_grad():
        lo = TF.cross_entropy(oat(s.x), s.y)
        with routing(fr, branch=s.branch):
            lf = TF.cross_entropy(fr(s.x), s.y)
    return abs(float(lo) - float(lf))


def selected_rows(a):
    out = []
    for key, label, group in ROWS:
        skip = None
        if "compiled" in key and not a.compile:
            skip = "needs --compile"
        elif key == "fastrobust_graph" and a.device_type != "cuda":
            skip = "CUDA only (cuda_graph=True)"
        out.append((key, label, group, skip))
    return out


def annotate(rows) -> None:
    ref = {(r["key"], r["precision"]): r for r in rows if "median_ms" in r}
    for r in rows:
        base = ref.get((REFERENCE[r["group"]], r["precision"]))
        if base and "median_ms" in r:
            r["speedup_vs_oat"] = base["median_ms"] / r["median_ms"]
        if "gpu_busy_ms" in r and "median_ms" in r:
            r["gpu_busy"] = r["gpu_busy_ms"] / r["median_ms"]


def table(rows) -> str:
    lines = ["| row | precision | median ms/step | min ms | warm-up s | GPU busy | "
             "speed-up vs OAT form |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_ms" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR: {r['error']}"
            lines.append(f"| {r['label']} | {r['precision']} | {why} | | | | |")
            continue
        busy = f"{r['gpu_busy']:.2f}" if "gpu_busy" in r else "-"
        sp = f"{r['speedup_vs_oat']:.2f}x" if "speedup_vs_oat" in r else ""
        lines.append(f"| {r['label']} | {r['precision']} | {r['median_ms']:.2f} | "
                     f"{r['min_ms']:.2f} | {r['warmup_s']:.1f} | {busy} | {sp} |")
    return "\n".join(lines)


def environment(dev, a) -> dict:
    import triton
    env = {"torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "device": str(dev),
           "date": time.strftime("%Y-%m-%d %H:%M"), "arch": a.arch, "width": a.width,
           "batch": a.batch, "pgd_steps": a.steps, "rounds": a.rounds, "warmup": a.warmup}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    try:
        env["backend_multi_bn"] = backends.choose("multi_bn", dev)
    except Exception as e:
        env["backend_multi_bn"] = short(e)
    return env


def write_json(path, env, rows, extra) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, **extra, "rows": rows}, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="resnet18")
    ap.add_argument("--smoke", action="store_true", help="width 4, batch 8, PGD-1, 1 round")
    ap.add_argument("--bf16", action="store_true",
                    help="also every row under bf16 autocast + channels_last")
    ap.add_argument("--compile", action="store_true",
                    help="add torch.compile(mode='reduce-overhead') fwd+bwd rows (minutes)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--only", default="", help="comma-separated row keys")
    ap.add_argument("--width", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int, help="PGD steps (7)")
    ap.add_argument("--rounds", type=int, help="timed steps per row (10)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (2)")
    ap.add_argument("--no-busy", action="store_true", help="skip the profiled GPU-busy pass")
    ap.add_argument("--no-cudnn-benchmark", action="store_true")
    a = ap.parse_args(argv)
    for name, full, smoke in (("width", 64, 4), ("batch", 256, 8), ("steps", 7, 1),
                              ("rounds", 10, 1), ("warmup", 2, 1)):
        if getattr(a, name) is None:
            setattr(a, name, smoke if a.smoke else full)
    dev = torch.device(a.device)
    a.device_type = dev.type
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark
    t_start = time.perf_counter()
    env = environment(dev, a)
    log(str(env))
    s = Setup(a, dev)
    try:
        extra = {"loss_check_abs_diff": check_same_loss(s)}
        check = f"|Δ| = {extra['loss_check_abs_diff']:.2e}"
    except Exception as e:  # reported, and the timings still run
        extra = {"loss_check_error": short(e)}
        check = f"failed: {extra['loss_check_error']}"
    log(f"loss check, OAT dual BN vs fastrobust, same weights: {check}")
    only = {k for k in a.only.split(",") if k}
    rows, steps_of = [], {}
    for bf16 in ((False, True) if a.bf16 else (False,)):
        prec = "bf16+CL" if bf16 else "fp32"
        for key, label, group, skip in selected_rows(a):
            if only and key not in only:
                continue
            row = {"key": key, "label": label, "group": group, "precision": prec}
            rows.append(row)
            if skip:
                row["skipped"] = skip
                continue
            t0 = time.perf_counter()
            try:
                step = build(key, s, bf16)
                warm = max(a.warmup, 3) if "compiled" in key else a.warmup
                row.update(time_row(step, dev, warm, a.rounds))
                steps_of[(key, prec)] = step
                log(f"{key} {prec}: median {row['median_ms']:.2f} ms "
                    f"(warm-up {row['warmup_s']} s) [{time.perf_counter() - t0:.1f} s]")
            except Exception as e:
                msg = short(e)
                if msg.startswith("RuntimeError: skipped: "):
                    row["skipped"] = msg[len("RuntimeError: skipped: "):]
                else:
                    row["error"] = msg
                log(f"{key} {prec}: {row.get('error') or row.get('skipped')}")
                with contextlib.suppress(Exception):
                    sync(dev)
            annotate(rows)
            if a.json:
                write_json(a.json, env, rows, extra)
    if dev.type == "cuda" and not a.no_busy:
        # the timings first, in case the profiler brings the process down
        print("timings before the GPU-busy pass:\n" + table(rows) + "\n", flush=True)
        log("GPU-busy pass: one profiled step per row (the CUDA-graph rows last)")
        for r in sorted(rows, key=lambda r: r["key"] == "fastrobust_graph"):
            step = steps_of.get((r["key"], r["precision"]))
            if step is None:
                continue
            try:
                r["gpu_busy_ms"] = gpu_busy_ms(step, dev)
            except Exception as e:
                r["gpu_busy_error"] = short(e)
                with contextlib.suppress(Exception):
                    sync(dev)
    annotate(rows)
    extra["seconds"] = round(time.perf_counter() - t_start, 1)
    title = env.get("gpu", platform.processor() or "cpu")
    print(f"fastrobust gpu_train_step — {a.arch} width {a.width}, batch {a.batch} "
          f"({s.n_clean} clean + {a.batch - s.n_clean} adversarial), PGD-{a.steps}; {title}, "
          f"torch {env['torch']}, triton {env['triton']}, BN backend "
          f"{env['backend_multi_bn']}{', SMOKE' if a.smoke else ''}\n")
    print(table(rows))
    print(f"\nloss check (OAT dual BN vs fastrobust, same weights, fp32): {check}")
    print(f"total {extra['seconds']:.1f} s")
    if a.json:
        write_json(a.json, env, rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
