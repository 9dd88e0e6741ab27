"""The GPU benchmark scripts (benchmarks/gpu_ops.py, benchmarks/gpu_train_step.py) run end to
end in their `--device cpu --smoke` mode, in a subprocess, and their tables and JSON hold
every expected row. They are run once on a GPU with a hard time limit, so every code path the
CPU can reach is exercised here. Content only: no figure is compared with another."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(script: str, tmp_path: Path, *args: str):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the scripts run the real backends (CPU here)
    env["OMP_NUM_THREADS"] = "1"  # shared cores: intra-op threads only wait on each other
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", "--smoke",
                           "--json", str(out), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


OPS_GROUPS = ["bn_train", "bn_eval", "bn_tiny", "bn_film_relu", "bn_bf16_cl", "mixed_eval",
              "mixed_train", "pgd_linf_4", "pgd_l2_4", "pgd_l2_2", "pgd_mifgsm_4"]


def test_gpu_ops_smoke(tmp_path):
    stdout, data = run_script("gpu_ops.py", tmp_path)
    rows = data["rows"]
    by_group = {}
    for r in rows:
        by_group.setdefault(r["key"], {})[r["impl"]] = r
    assert list(by_group) == OPS_GROUPS
    assert data["copy_GBps"] > 0
    assert data["environment"]["backend_multi_bn"] == "cpu"
    for key, impls in by_group.items():
        names = list(impls)
        assert names[0].startswith("fastrobust"), (key, names)
        for name, r in impls.items():
            assert "error" not in r, (key, name, r)
            line = f"| {r['group']} | {name} |"
            assert line in stdout, line
            if "[cuda]" in name:
                assert r["skipped"] == "CUDA device only"
                continue
            if name.startswith("torch.compile"):
                assert r["skipped"] == "needs --compile"
                continue
            for fig in ("wall_us", "host_us", "gpu_us", "GBps", "of_copy"):
                assert r[fig] > 0, (key, name, fig)
            assert r["gpu_method"] == "profiler-cpu"
            if name != names[0]:
                assert set(r["speedup"]) == {"wall_us", "gpu_us", "host_us"}, (key, name)
    # the groups and their baselines
    assert {"OAT dual BN (slice, 2 BN, cat)", "F.batch_norm whole batch (floor)",
            "torch.compile(OAT dual BN)"} <= set(by_group["bn_train"])
    assert set(by_group["bn_eval"]) == set(by_group["bn_train"])
    assert {"eager BN+FiLM+ReLU (3 modules)", "OAT dual BN+FiLM+ReLU"} <= \
        set(by_group["bn_film_relu"])
    assert "2 nn.BatchNorm2d + weighted sum" in by_group["mixed_eval"]
    for key in OPS_GROUPS[-4:]:
        assert "torchattacks step (eager)" in by_group[key]
    # byte model: BN fwd+bwd 5|x|, eval fwd 2|x| (16x8x8x8 fp32), bf16 halves it, PGD 16/24 B
    n = 16 * 8 * 8 * 8
    assert by_group["bn_train"]["fastrobust"]["bytes"] == 5 * n * 4
    assert by_group["bn_eval"]["fastrobust"]["bytes"] == 2 * n * 4
    assert by_group["bn_bf16_cl"]["fastrobust"]["bytes"] == 5 * 16 * 16 * 4 * 4 * 2
    assert by_group["pgd_linf_4"]["fastrobust"]["bytes"] == 4 * 3 * 16 * 16 * 16
    assert by_group["pgd_mifgsm_4"]["fastrobust"]["bytes"] == 4 * 3 * 16 * 16 * 24
    # host overhead: one-call figures for the tiny group and the summary lines
    tiny = by_group["bn_tiny"]
    assert set(tiny) == {"fastrobust multi_batch_norm", "F.batch_norm",
                         "fastrobust DualBatchNorm2d module", "nn.BatchNorm2d module",
                         "x.add_(0) (trivial op)"}
    assert all(r["host_one_call_us"] > 0 for r in tiny.values())
    assert "host per BN forward, fastrobust multi_batch_norm / F.batch_norm" in stdout
    assert "host per BN forward, fastrobust DualBatchNorm2d module / nn.BatchNorm2d" in stdout
    assert "| group | implementation | wall µs | GPU µs |" in stdout


def test_gpu_ops_only_and_profiler_flag(tmp_path):
    _, data = run_script("gpu_ops.py", tmp_path, "--only", "pgd_linf_4",
                         "--kernel-time", "profiler")
    assert {r["key"] for r in data["rows"]} == {"pgd_linf_4"}


STEP_ROWS = {"plain": "plain BN + torchattacks PGD",
             "oat": "OAT repo: dual BN (slice/2 BN/cat) + OAT PGD",
             "oat_ta": "OAT dual BN + torchattacks PGD",
             "fastrobust": "fastrobust: convert_multi_bn + routing + PGD",
             "fastrobust_graph": "fastrobust + PGD(cuda_graph=True)",
             "fb_plain": "fwd+bwd only: plain BN",
             "fb_oat": "fwd+bwd only: OAT dual BN",
             "fb_fastrobust": "fwd+bwd only: fastrobust",
             "fb_compiled_oat": "fwd+bwd only: torch.compile(reduce-overhead) OAT dual BN",
             "fb_compiled_fastrobust":
                 "fwd+bwd only: torch.compile(reduce-overhead) fastrobust"}


def test_gpu_train_step_smoke(tmp_path):
    stdout, data = run_script("gpu_train_step.py", tmp_path, "--bf16")
    rows = data["rows"]
    assert [(r["key"], r["precision"]) for r in rows] == \
        [(k, p) for p in ("fp32", "bf16+CL") for k in STEP_ROWS]
    for r in rows:
        assert r["label"] == STEP_ROWS[r["key"]]
        assert f"| {r['label']} | {r['precision']} |" in stdout
        assert "error" not in r, r
        if r["key"] == "fastrobust_graph":
            assert r["skipped"].startswith("CUDA only")
        elif "compiled" in r["key"]:
            assert r["skipped"] == "needs --compile"
        else:
            assert r["median_ms"] > 0 and r["min_ms"] > 0 and len(r["times_ms"]) == 1
            assert r["speedup_vs_oat"] > 0
    # the OAT dual-BN model and the fastrobust model agree on the same weights and batch
    assert data["loss_check_abs_diff"] < 1e-4
    env = data["environment"]
    assert (env["arch"], env["width"], env["batch"], env["pgd_steps"]) == ("resnet18", 4, 8, 1)
    assert "| row | precision | median ms/step |" in stdout


def test_gpu_train_step_resnet34_subset(tmp_path):
    _, data = run_script("gpu_train_step.py", tmp_path, "--arch", "resnet34", "--only",
                         "oat,fastrobust")
    assert [r["key"] for r in data["rows"]] == ["oat", "fastrobust"]
    assert all("median_ms" in r for r in data["rows"])
    assert data["environment"]["arch"] == "resnet34"


def test_gpu_busy_union():
    """The GPU-busy figure counts overlapping device intervals once."""
    sys.path.insert(0, str(BENCH))
    try:
        from gpu_train_step import union_length
    finally:
        sys.path.remove(str(BENCH))
    assert union_length([]) == 0
    assert union_length([(0, 10), (5, 15), (20, 30)]) == 25
    assert union_length([(20, 30), (0, 10), (2, 3)]) == 20


@pytest.mark.parametrize("script", ["gpu_ops.py", "gpu_train_step.py"])
def test_scripts_document_themselves(script):
    text = (BENCH / script).read_text()
    assert text.startswith('"""') and len(text.splitlines()) <= 660
    assert "--smoke" in text.split('"""')[1]
