"""Resume honours the run: a kill during a checkpoint write, extending the epochs, a changed
option refused or overridden, and non-finite weights stopping the run."""
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from fastrobust.cli import main
from fastrobust.trainers.base import TrainingDiverged
from fastrobust.trainers.checkpoints import load_checkpoint, remove_stale_temporaries
from fastrobust.trainers.oat import OATConfig, OATTrainer


def _cfg(out, **kw):
    base = dict(width=4, epochs=2, batch_size=64, steps=0, max_train_batches=1, eval_steps=0,
                out=str(out), lr=0.1)
    return OATConfig(**{**base, **kw})


def _lrs(history):
    return [h["lr"] for h in history]


def test_extending_epochs_replans_the_schedule(tmp_path):
    """--epochs beyond the checkpoint's: the remaining epochs get the learning rates of a run
    planned for the new length (cosine decaying to 0 at the new end), never climbing back up
    as the old 2-epoch cosine would."""
    OATTrainer(_cfg(tmp_path / "a"), progress=False).fit(log=lambda *a: None)
    ext = OATTrainer(_cfg(tmp_path / "a", epochs=5), resume=True, progress=False)
    assert ext.resumed_changes == {"epochs": (2, 5)}
    ext.fit(log=lambda *a: None)
    fresh = OATTrainer(_cfg(tmp_path / "b", epochs=5), progress=False)
    fresh.fit(log=lambda *a: None)
    got, want = _lrs(ext.history)[2:], _lrs(fresh.history)[2:]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert all(a >= b for a, b in zip(got, got[1:])) and got[-1] == pytest.approx(0, abs=1e-12)
    ck = load_checkpoint(str(tmp_path / "a" / "last.pt"))
    assert ck["config"]["epochs"] == 5 and ck["epoch"] == 5
    assert ck["resumes"] == [{"after_epoch": 2, "changes": {"epochs": [2, 5]}}]


def test_changed_option_is_refused_then_overridden(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "oat", "--out", str(out), "--width", "4", "--batch-size", "64",
              "--steps", "0", "--max-train-batches", "1", "--eval-steps", "0"]
    assert main(common + ["--epochs", "2"]) == 0
    ck0 = load_checkpoint(str(out / "last.pt"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(common + ["--resume", "--lr", "0.05", "--eps", "0.1", "--epochs", "2"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "--eps 0.1 (the run has 0.0313" in err and "--lr 0.05 (the run has 0.1)" in err
    assert "--override" in err
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == ck0["epoch"]  # nothing ran
    # --override applies them: the lr is rescaled from where the schedule is, eps recorded.
    assert main(common + ["--resume", "--override", "--lr", "0.05", "--eps", "0.1",
                          "--epochs", "3"]) == 0
    ck = load_checkpoint(str(out / "last.pt"))
    assert ck["config"]["lr"] == 0.05 and ck["config"]["eps"] == 0.1
    assert ck["resumes"][-1]["after_epoch"] == 2
    assert ck["resumes"][-1]["changes"]["lr"] == [0.1, 0.05]
    assert ck["resumes"][-1]["changes"]["eps"] == [8 / 255, 0.1]
    # epoch 3 of a 3-epoch cosine at base 0.05: 0 at the end; epoch 3's lr is read after
    # the step, and the lr used in epoch 3 was 0.05·(1 + cos(2π/3))/2.
    assert ck["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert ck["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(0.05)


def test_resume_keeps_the_run_configuration(tmp_path):
    """Options not given on resume come from the checkpoint, not from the defaults."""
    OATTrainer(_cfg(tmp_path, eps=0.2, alpha=0.05), progress=False).fit(log=lambda *a: None)
    with pytest.raises(SystemExit):  # a differing --width needs --override
        main(["train", "oat", "--out", str(tmp_path), "--resume", "--width", "8"])
    code = main(["train", "oat", "--out", str(tmp_path), "--resume", "--epochs", "3"])
    assert code == 0
    ck = load_checkpoint(str(tmp_path / "last.pt"))
    assert ck["config"]["eps"] == 0.2 and ck["config"]["width"] == 4


def test_width_override_that_cannot_fit_is_one_line(tmp_path, capsys):
    OATTrainer(_cfg(tmp_path), progress=False).fit(log=lambda *a: None)
    capsys.readouterr()
    code = main(["train", "oat", "--out", str(tmp_path), "--resume", "--override", "--width",
                 "8", "--epochs", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "weights do not fit the model" in err and "last.pt" in err


def test_nonfinite_weights_stop_the_run(tmp_path):
    """The losses are computed before each step: weights a last step made NaN must still
    stop the run, and the checkpoint kept is the last finite one."""
    trainer = OATTrainer(_cfg(tmp_path, epochs=3), progress=False)
    step = trainer.step

    def poisoned(*a, **kw):
        loss = step(*a, **kw)
        if trainer.epoch == 1:  # the second epoch's only step leaves NaN weights
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
        return loss

    trainer.step = poisoned
    with pytest.raises(TrainingDiverged, match="weights became non-finite after epoch 2"):
        trainer.fit(log=lambda *a: None)
    ck = load_checkpoint(str(tmp_path / "last.pt"))
    assert ck["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point())


def test_nan_lr_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="lr must be finite"):
        OATTrainer(_cfg(tmp_path, lr=float("nan")), progress=False)
    assert not os.path.exists(tmp_path / "last.pt")


WRITER = textwrap.dedent("""
    import sys, torch
    from fastrobust.trainers.checkpoints import save_checkpoint
    path = sys.argv[1]
    big = torch.randn(16_000_000)  # 64 MB: each write takes a while
    i = 0
    while True:
        save_checkpoint(path, {"config": {}, "i": i, "big": big})
        i += 1
        print(i, flush=True)
""")


def test_kill_during_checkpoint_writes(tmp_path):
    """SIGKILL while checkpoints are being written: last.pt is always a whole checkpoint, and
    the temporary files the kills leave are removed when a run starts there."""
    path = str(tmp_path / "last.pt")
    for attempt in range(3):
        p = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE,
                             text=True)
        p.stdout.readline()  # one checkpoint written; the next one is being written
        time.sleep(0.05 + 0.1 * attempt)
        p.send_signal(signal.SIGKILL)
        p.wait()
        ck = load_checkpoint(path)
        assert ck["big"].shape == (16_000_000,) and ck["i"] >= 0
    removed = remove_stale_temporaries(str(tmp_path))
    left = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert left == [] and all(r.endswith(".tmp") for r in removed)


def test_a_run_starting_cleans_stale_temporaries(tmp_path):
    stale = tmp_path / ".ckpt-abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    OATTrainer(_cfg(tmp_path, epochs=1), progress=False)
    assert not stale.exists()


def test_epochs_below_progress_needs_override(tmp_path, capsys):
    OATTrainer(_cfg(tmp_path, epochs=2), progress=False).fit(log=lambda *a: None)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train", "oat", "--out", str(tmp_path), "--resume", "--epochs", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--epochs 1 (the run has 2)" in err
    assert math.isfinite(load_checkpoint(str(tmp_path / "last.pt"))["history"][-1]["loss"])


# --- checkpoints this version cannot take as they are; Ctrl-C ------------------------------------

COMMON = ["--width", "4", "--batch-size", "64", "--steps", "0", "--max-train-batches", "1",
          "--eval-steps", "0"]


def _edit_checkpoint(path, edit):
    ck = torch.load(path, weights_only=False)
    edit(ck)
    torch.save(ck, path)
    return os.path.getmtime(path)


def _lines(err: str) -> list[str]:
    """stderr as a terminal shows it: the text after each line's last carriage return (a
    closed progress bar leaves only its erasure), blank lines dropped."""
    return [ln.rsplit("\r", 1)[-1] for ln in err.split("\n") if ln.rsplit("\r", 1)[-1].strip()]


def _at_lr_zero(ck):
    """A run made with --lr 0, which older versions took."""
    ck["config"]["lr"] = 0.0
    for group in ck["optimizer"]["param_groups"]:
        group["lr"] = group["initial_lr"] = 0.0
    ck["scheduler"]["base_lrs"] = [0.0]
    ck["scheduler"]["_last_lr"] = [0.0]


def test_a_run_at_lr_zero_is_refused_then_resumes_with_an_overridden_lr(tmp_path, capsys):
    OATTrainer(_cfg(tmp_path, epochs=1), progress=False).fit(log=lambda *a: None)
    path = str(tmp_path / "last.pt")
    mtime = _edit_checkpoint(path, _at_lr_zero)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # its lr 0 is refused, and named
        main(["train", "oat", "--out", str(tmp_path), "--resume", "--epochs", "3"])
    lines = _lines(capsys.readouterr().err)
    assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in lines[0]
    assert "--lr must be > 0, got 0.0 in the run's configuration" in lines[0], lines[0]
    assert path in lines[0] and "--override" in lines[0]
    assert os.path.getmtime(path) == mtime  # nothing ran
    # --override --lr 0.1: the schedule is planned at the new base from where the run is (it
    # used to divide by the old lr: ZeroDivisionError)
    trainer = OATTrainer(_cfg(tmp_path, epochs=3, lr=0.1), resume=True, progress=False)
    assert trainer.resumed_changes == {"lr": (0.0, 0.1), "epochs": (1, 3)}
    trainer.fit(log=lambda *a: None)
    want = [0.05 * (1 + math.cos(math.pi * k / 3)) for k in (2, 3)]
    assert _lrs(trainer.history)[1:] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("entry", ["rng", "optimizer"])
def test_a_checkpoint_missing_an_entry_is_one_line(tmp_path, capsys, entry):
    OATTrainer(_cfg(tmp_path, epochs=1), progress=False).fit(log=lambda *a: None)
    path = str(tmp_path / "last.pt")
    mtime = _edit_checkpoint(path, lambda ck: ck.pop(entry))
    capsys.readouterr()
    code = main(["train", "oat", "--out", str(tmp_path), "--resume", "--epochs", "2"])
    lines = _lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("fastrobust train oat: error: ") and path in lines[0]
    assert f"has no {entry!r} entry" in lines[0]
    assert os.path.getmtime(path) == mtime


def test_an_unknown_option_in_a_checkpoint_is_one_warning(tmp_path, capsys, monkeypatch):
    """An option of the run's configuration that this version does not have is named in one
    warning line, on resume and by eval (which takes a run directory for its last.pt)."""
    from fastrobust.cli import evaluate as cli_evaluate, train as cli_train

    sweep_all = cli_train.sweep_all  # the final sweeps at λ = 0 only: this test is about the files
    for command in (cli_train, cli_evaluate):
        monkeypatch.setattr(command, "sweep_all",
                            lambda *a, **kw: sweep_all(*a, **{**kw, "lambdas": [0.0]}))
    OATTrainer(_cfg(tmp_path, epochs=1), progress=False).fit(log=lambda *a: None)
    path = str(tmp_path / "last.pt")
    _edit_checkpoint(path, lambda ck: ck["config"].update(mixup_alpha=0.2))
    capsys.readouterr()
    for argv in (["train", "oat", "--out", str(tmp_path), "--resume", "--epochs", "1"],
                 ["eval", str(tmp_path)]):
        assert main(argv) == 0
        warned = [ln for ln in _lines(capsys.readouterr().err) if "warning" in ln]
        assert len(warned) == 1, warned
        assert "'mixup_alpha' (0.2)" in warned[0] and path in warned[0]
        assert "does not know" in warned[0]
    assert os.path.isfile(tmp_path / "results.json")


def test_ctrl_c_before_the_first_checkpoint(tmp_path, capsys, monkeypatch):
    def interrupted(self, log=print):
        raise KeyboardInterrupt

    monkeypatch.setattr(OATTrainer, "fit", interrupted)
    try:
        code = main(["train", "oat", "--out", str(tmp_path), *COMMON])
    except KeyboardInterrupt:  # not let through: it would end the whole test session
        pytest.fail("Ctrl-C came out of main() as KeyboardInterrupt")
    lines = _lines(capsys.readouterr().err)
    assert code == 130 and len(lines) == 1
    assert "interrupted before this run wrote a checkpoint; nothing to resume" in lines[0]


def test_ctrl_c_is_one_line_naming_the_checkpoint_and_resume(tmp_path):
    """SIGINT to a training run after its first checkpoint: exit status 130 and one line on
    stderr (no traceback) with the checkpoint and the command that resumes it."""
    out = tmp_path / "run"
    # A shell's background job ignores SIGINT, and so would the child: it takes Ctrl-C's
    # default handling back itself, as in a terminal (not in a preexec_fn, which runs Python
    # between fork and exec and can deadlock in a process with threads, as a test worker is).
    child = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from fastrobust.cli import main; sys.exit(main(sys.argv[1:]))")
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:  # a file, not a pipe nobody reads while it fills
        p = subprocess.Popen(
            [sys.executable, "-c", child, "train", "oat", "--out", str(out), *COMMON,
             "--epochs", "100000"], stdout=subprocess.PIPE, stderr=err_file, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        epoch = threading.Event()

        def read():  # an epoch's line comes after its checkpoint
            for line in p.stdout:
                if line.startswith("epoch"):
                    epoch.set()

        threading.Thread(target=read, daemon=True).start()
        assert epoch.wait(120), "no epoch line from the training run in 120 s"
        p.send_signal(signal.SIGINT)
        p.wait(timeout=120)
    finally:
        p.kill()
        p.wait()
    err = err_path.read_text()
    lines = _lines(err)
    assert p.returncode == 130, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fastrobust train oat: interrupted; the last checkpoint is "
                               f"{out / 'last.pt'}"), lines[0]
    assert f"fastrobust train oat --out {out} --resume" in lines[0]
    assert load_checkpoint(str(out / "last.pt"))["epoch"] >= 1
