"""A run's configuration: the fields every trainer shares (`BaseConfig`), the checks of a
config field, of the device and of ``--deterministic``, and what ``--deterministic`` sets."""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import ClassVar

import torch

from .. import data as data_mod
from ..memory_format import FORMATS


class ConfigError(ValueError):
    """A config field with a bad value. ``field`` names it (the command line names its flag
    instead), ``message`` says what was expected and what was given."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


def check_number(cfg, field: str, lo=None, hi=None, *, lo_open=False, integer=False) -> None:
    """``cfg.<field>`` is a finite number (an int with ``integer``) in [lo, hi] (lo excluded
    with ``lo_open``), else ConfigError."""
    v = getattr(cfg, field)
    if integer and isinstance(v, float) and v.is_integer():
        v = int(v)
        setattr(cfg, field, v)
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ConfigError(field, f"must be {'an integer' if integer else 'a number'}, "
                          f"got {v!r}")
    if not math.isfinite(v):
        raise ConfigError(field, f"must be finite, got {v}")
    low_ok = lo is None or (v > lo if lo_open else v >= lo)
    if not low_ok or (hi is not None and v > hi):
        if hi is None:
            want = f"{'>' if lo_open else '>='} {lo}"
        else:
            want = f"in {'(' if lo_open else '['}{lo}, {hi}]"
        raise ConfigError(field, f"must be {want}, got {v}")


# The attack radius (linf, pixels in [0, 1]) a method's defaults start from, per data set: the
# papers' 8/255 on CIFAR-10 and SVHN. On the digits (17 grey levels, 1/16 apart) 8/255 moves no
# pixel across a level: a standard model keeps ~96 % under PGD-10. 0.2, the demo's scale: a
# standard ResNet-18/w8 keeps 0.3 % under PGD-10 and 4 epochs of PGD-AT reach SA 90.0 % / RA
# 30.4 %; at the demo's 0.3 the same PGD-AT reaches only 56.8 % / 8.4 %.
ATTACK_EPS = {"digits": 0.2, "cifar10": 8 / 255, "svhn": 8 / 255}


def _short(v) -> str:
    """A default as help text: 8/255 for 8/255, else the number."""
    if isinstance(v, float) and len(f"{v:g}") > 5 and abs(v * 255 - round(v * 255)) < 1e-9:
        return f"{round(v * 255)}/255"
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclasses.dataclass
class BaseConfig:
    """The fields every trainer shares; each method's config extends it (and is stored in its
    checkpoints, so ``--resume`` and ``eval`` rebuild the same run).

    ``DATASET_DEFAULTS`` ({field: {dataset: value}}): fields whose default depends on the data
    set. Such a field defaults to None, and `validate` sets it from the table for the run's
    data set; a value given explicitly is kept. The checkpoint stores the resolved value."""
    DATASET_DEFAULTS: ClassVar[dict] = {}

    dataset: str = "digits"
    data_root: str | None = None
    width: int = 64                 # ResNet base width (64: the standard CIFAR model)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    steps: int = 7                  # PGD steps in training
    random_start: bool = True       # PGD starts from a random point of the ε-ball
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/run"
    eval_steps: int = 20            # PGD steps of the final evaluation
    max_train_batches: int = 0      # > 0: stop each epoch after that many batches (smoke runs)
    memory_format: str = "auto"     # auto | channels_last | contiguous (fastrobust.memory_format)
    precision: str = "fp32"         # fp32 | bf16 (autocast of the forward passes and attacks)
    sync_bn: bool = True            # under DDP: batch statistics over the global batch
    deterministic: bool = False     # torch's deterministic algorithms (`use_deterministic`)

    def validate(self) -> None:
        """Every shared field, with a ConfigError naming the first bad one; nothing is read
        or built."""
        if self.dataset not in data_mod.DATASETS:
            raise ConfigError("dataset", f"must be one of {data_mod.DATASETS}, got "
                              f"{self.dataset!r}")
        self.resolve_defaults()
        if self.data_root is not None and not os.path.isdir(self.data_root):
            raise ConfigError("data_root", f"must be a directory, got {self.data_root!r}")
        check_number(self, "width", 1, integer=True)
        check_number(self, "epochs", 0, integer=True)
        check_number(self, "batch_size", 1, integer=True)
        check_number(self, "lr", 0, lo_open=True)
        check_number(self, "momentum", 0, 1)
        check_number(self, "weight_decay", 0)
        check_number(self, "steps", 0, integer=True)
        check_number(self, "seed", 0, integer=True)
        check_number(self, "eval_steps", 0, integer=True)
        check_number(self, "max_train_batches", 0, integer=True)
        if self.memory_format not in FORMATS:
            raise ConfigError("memory_format", f"must be one of {FORMATS}, got "
                              f"{self.memory_format!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError("precision", f"must be 'fp32' or 'bf16', got {self.precision!r}")
        check_device(self.device)
        check_deterministic(self.deterministic, self.device)
        check_output_dir(self.out)

    def resolve_defaults(self) -> None:
        """Every per-data-set field still None takes its data set's value (`DATASET_DEFAULTS`)."""
        for field, table in self.DATASET_DEFAULTS.items():
            if getattr(self, field) is None:
                setattr(self, field, table[self.dataset])

    @classmethod
    def default_text(cls, field: str) -> str:
        """``field``'s default for --help: "0.3 on digits, 8/255 on cifar10 and svhn" for a
        per-data-set one, else its value."""
        table = cls.DATASET_DEFAULTS.get(field)
        if table is None:
            return _short(cls.__dataclass_fields__[field].default)
        by_value: dict[str, list[str]] = {}
        for name, value in table.items():
            by_value.setdefault(_short(value), []).append(name)
        return ", ".join(f"{v} on {' and '.join(names)}" for v, names in by_value.items())


def check_device(device) -> None:
    """A device string this torch can use, else ConfigError("device", ...)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError("device", f"must be a torch device such as 'cpu' or 'cuda', got "
                          f"{device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"is {device!r} but CUDA is not available (torch "
                              f"{torch.__version__}"
                              f"{', a CPU build' if torch.version.cuda is None else ''})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError("device", f"is {device!r} but only {torch.cuda.device_count()} "
                              "CUDA devices exist")
    elif dev.type != "cpu":
        raise ConfigError("device", f"must be 'cpu' or 'cuda[:i]', got {device!r}")


# CUBLAS_WORKSPACE_CONFIG values with which cuBLAS gives the same bits on every run (its
# default workspace lets a GEMM split its reduction differently from one call to the next).
CUBLAS_REPRODUCIBLE = (":4096:8", ":16:8")


def check_deterministic(deterministic, device) -> None:
    """``deterministic`` is a bool that this run can honour, else ConfigError("deterministic",
    ...): on CUDA, cuBLAS is reproducible only with CUBLAS_WORKSPACE_CONFIG unset (the run
    sets it) or one of `CUBLAS_REPRODUCIBLE`."""
    if not isinstance(deterministic, bool):
        raise ConfigError("deterministic", f"must be True or False, got {deterministic!r}")
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if deterministic and torch.device(device).type == "cuda" and env is not None and \
            env not in CUBLAS_REPRODUCIBLE:
        raise ConfigError("deterministic", "on CUDA needs CUBLAS_WORKSPACE_CONFIG unset or "
                          f"one of {', '.join(CUBLAS_REPRODUCIBLE)} (cuBLAS's reproducible "
                          f"workspaces), got {env!r}")


def use_deterministic(device) -> None:
    """What ``--deterministic`` sets, process-wide, before the run's first kernel:
    ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel raises
    instead of running; uninitialized memory is filled); on CUDA also cuDNN's deterministic
    algorithms without benchmarking, and cuBLAS's reproducible workspace (read when its first
    handle is made). fastrobust's own kernels need nothing more: the CPU, Triton and CUDA C++
    kernels use no atomics, and each sums its partial results in a fixed order."""
    if torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_REPRODUCIBLE[0])
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def check_output_dir(path: str) -> None:
    """``path`` is a directory this process can write to (made when missing), else
    ConfigError("out", ...): a run finds out now, not after its first epoch."""
    if not isinstance(path, str) or not path:
        raise ConfigError("out", f"must be a directory path, got {path!r}")
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise ConfigError("out", f"is a file, not a directory: {path}")
    try:
        os.makedirs(full, exist_ok=True)
        with tempfile.TemporaryFile(dir=full):
            pass
    except OSError as e:
        raise ConfigError("out", f"is not a writable directory: {path} ({e.strerror})") from None
