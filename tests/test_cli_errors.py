"""Every bad option of the command line: exit status 2, one line on stderr naming the flag, no
traceback, and nothing trained (no checkpoint written)."""
import os

import pytest
import torch

from fastrobust.cli import main

# (subcommand, arguments, a fragment the one line must hold)
CASES = [
    ("oat", ["--eps", "-0.1"], "--eps must be in [0, 1], got -0.1"),
    ("oat", ["--eps", "nan"], "--eps must be finite"),
    ("oat", ["--eps", "2"], "--eps must be in [0, 1]"),
    ("oat", ["--alpha", "-0.1"], "--alpha must be in [0, 1], got -0.1"),
    ("oat", ["--width", "0"], "--width must be >= 1, got 0"),
    ("oat", ["--width", "-4"], "--width must be >= 1, got -4"),
    ("oat", ["--width", "four"], "--width: invalid int value"),
    ("oat", ["--lr", "nan"], "--lr must be finite"),
    ("oat", ["--lr", "inf"], "--lr must be finite"),
    ("oat", ["--lr", "-1"], "--lr must be > 0, got -1"),
    ("oat", ["--lr", "0"], "--lr must be > 0, got 0"),
    ("oat", ["--epochs", "0"], "--epochs must be >= 1"),
    ("oat", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("oat", ["--steps", "-1"], "--steps must be >= 0"),
    ("oat", ["--eval-steps", "-2"], "--eval-steps must be >= 0"),
    ("oat", ["--max-train-batches", "-1"], "--max-train-batches must be >= 0"),
    ("oat", ["--seed", "-1"], "--seed must be >= 0"),
    ("oat", ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    ("oat", ["--lambdas", "0.5", "1"], "--lambdas must lie in [0, 1] and include 0"),
    ("oat", ["--lambdas", "0", "1.5"], "--lambdas must lie in [0, 1]"),
    ("oat", ["--dim", "0"], "--dim must be >= 1"),
    ("oat", ["--lambdas", "0", "0.5", "0.5"], "--lambdas must be distinct"),
    ("oat", ["--sampling", "random"], "--sampling: invalid choice"),
    ("oat", ["--variant", "paper"], "--variant: invalid choice"),
    ("oat", ["--attack-loss", "cw"], "--attack-loss: invalid choice"),
    ("oat", ["--arch", "wrn", "--depth", "5"], "--depth must be 6n + 4 with n >= 1"),
    ("oat", ["--arch", "wrn", "--depth", "-2"], "--depth must be 6n + 4 with n >= 1"),
    ("oat", ["--arch", "wrn", "--widen", "0"], "--widen must be >= 1, got 0"),
    ("oat", ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"],
     "--device"),
    ("oat", ["--device", "gpu0"], "--device must be a torch device"),
    ("oat", ["--memory-format", "nhwc"], "--memory-format: invalid choice"),
    ("oat", ["--deterministic=yes"], "--deterministic: ignored explicit argument"),
    ("oat", ["--data-root", "/nonexistent/data"], "--data-root must be a directory"),
    ("oat", ["--dataset", "mnist"], "--dataset: invalid choice"),
    ("oats", ["--widths", "0", "1"], "--widths must lie in (0, 1]"),
    ("oats", ["--arch", "wrn"], "--widths (OATS) is implemented for the ResNets"),
    ("afa", ["--max-eps", "0"], "--max-eps must be in (0, 1]"),
    ("afa", ["--branches", "1"], "--branches must be >= 2"),
    ("afa", ["--lr2", "nan"], "--lr2 must be finite"),
    ("afa", ["--lr2", "0"], "--lr2 must be > 0, got 0"),
    ("afa", ["--lr", "0"], "--lr must be > 0, got 0"),
    ("awnet", ["--lr", "0"], "--lr must be > 0, got 0"),
    ("afa", ["--epochs2", "-1"], "--epochs2 must be >= 0"),
    ("awnet", ["--tau", "0"], "--tau must be > 0"),
    ("awnet", ["--beta", "-1"], "--beta must be > 0"),
    ("awnet", ["--teacher-nat", "/nonexistent.pt"], "--teacher-nat must be a saved nn.Module"),
    ("awnet", ["--eps", "-1"], "--eps must be in [0, 1]"),
]


def _run(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    return exc.value.code, err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("method, args, fragment", CASES,
                         ids=[f"{m}{''.join(a)}" for m, a, _ in CASES])
def test_bad_option(capsys, tmp_path, method, args, fragment):
    out = tmp_path / "run"
    code, err = _run(capsys, ["train", method, "--out", str(out), *args])
    line = _one_line(err)
    assert code == 2
    assert line.startswith(f"fastrobust train {method}: error: "), line
    assert fragment in line, line
    assert not (out / "last.pt").exists()


def test_out_is_a_file(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, err = _run(capsys, ["train", "oat", "--out", str(f)])
    assert code == 2 and "--out is a file, not a directory" in _one_line(err)


def test_out_cannot_be_made(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, err = _run(capsys, ["train", "oat", "--out", str(f / "sub")])
    assert code == 2 and "--out is not a writable directory" in _one_line(err)


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, os.urandom(2048)],
                         ids=["empty", "zeros", "random"])
def test_damaged_checkpoint(capsys, tmp_path, content):
    ck = tmp_path / "last.pt"
    ck.write_bytes(content)
    code, err = _run(capsys, ["train", "oat", "--out", str(tmp_path), "--resume"])
    line = _one_line(err)
    assert code == 2 and str(ck) in line and "not a readable checkpoint" in line, line
    code, err = _run(capsys, ["eval", str(ck)])
    line = _one_line(err)
    assert code == 2 and str(ck) in line and "not a readable checkpoint" in line, line


def test_resume_without_checkpoint(capsys, tmp_path):
    code, err = _run(capsys, ["train", "afa", "--out", str(tmp_path), "--resume"])
    assert code == 2 and "no checkpoint at" in _one_line(err)


def test_eval_bad_options(capsys, tmp_path):
    code, err = _run(capsys, ["eval", str(tmp_path / "missing.pt")])
    assert code == 2 and "no checkpoint at" in _one_line(err)
    code, err = _run(capsys, ["eval", str(tmp_path / "x.pt"), "--steps", "-1"])
    assert code == 2 and "--steps must be >= 0" in _one_line(err)


def test_demo_bad_option(capsys):
    code, err = _run(capsys, ["demo", "--width", "0"])
    assert code == 2 and "fastrobust demo: error: --width must be >= 1" in _one_line(err)


@pytest.mark.parametrize("args, fragment", [
    (["--timing-steps", "0"], "--timing-steps: must be >= 1, got 0"),
    (["--batch", "0"], "--batch: must be >= 1, got 0"),
    (["--width", "-1"], "--width: must be >= 1, got -1"),
    (["--steps", "-1"], "--steps: must be >= 0, got -1"),
], ids=lambda v: "".join(v) if isinstance(v, list) else None)
def test_speed_bad_option(capsys, args, fragment):
    code, err = _run(capsys, ["speed", *args])
    line = _one_line(err)
    assert code == 2 and line.startswith("fastrobust speed: error: ") and fragment in line


@pytest.mark.parametrize("files", [[], ["teacher_nat.pt", "best.pt"]], ids=["empty", "others"])
def test_eval_a_directory_without_last_pt_names_what_is_there(capsys, tmp_path, files):
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    code, err = _run(capsys, ["eval", str(tmp_path)])
    line = _one_line(err)
    assert code == 2 and f"{tmp_path} is a directory without a last.pt" in line, line
    assert ("best.pt, teacher_nat.pt" in line) if files else ("no .pt file" in line)


def test_deterministic_on_cuda_with_a_nonreproducible_cublas_workspace(capsys, tmp_path,
                                                                        monkeypatch):
    """--deterministic on CUDA with a CUBLAS_WORKSPACE_CONFIG that cuBLAS cannot reproduce
    with: one line naming the flag and the variable, before anything is built (CUDA is
    faked present: the check precedes any CUDA call)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    out = tmp_path / "run"
    code, err = _run(capsys, ["train", "oat", "--out", str(out), "--device", "cuda",
                              "--deterministic"])
    line = _one_line(err)
    assert code == 2 and line.startswith("fastrobust train oat: error: --deterministic on CUDA "
                                         "needs CUBLAS_WORKSPACE_CONFIG"), line
    assert "':0:0'" in line and not (out / "last.pt").exists()


def test_deterministic_refusal_is_one_line(capsys, tmp_path, monkeypatch):
    """An op without a deterministic kernel under --deterministic: torch's refusal becomes one
    line naming the flag and the op, exit status 2 (here a put_, which has none)."""
    from fastrobust.trainers.oat import OATTrainer

    def fit(self, log=print):
        torch.zeros(2).put_(torch.tensor([0]), torch.ones(1))

    mode = torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(OATTrainer, "fit", fit)
    try:
        code = main(["train", "oat", "--out", str(tmp_path), "--width", "4",
                     "--deterministic"])
    finally:
        torch.use_deterministic_algorithms(mode)
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("fastrobust train oat: error: --deterministic: put_ "
                                         "does not have a deterministic implementation"), line
