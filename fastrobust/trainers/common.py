"""What every trainer shares: atomic checkpoints with the random-number state (so ``--resume``
continues a run exactly), the divergence check, the λ/width sweep table, JSON results and
plots."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from typing import ClassVar, Iterable

import torch

from .. import __version__


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


class ConfigError(ValueError):
    """A config field with a bad value. ``field`` names it (the command line names its flag
    instead), ``message`` says what was expected and what was given."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or from another kind of run (one line)."""


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
        from .. import data as data_mod
        from ..memory_format import FORMATS

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


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles: nothing to sync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str) -> list[str]:
    """Removes the ``.ckpt-*.tmp`` files a killed run left beside its checkpoints (a run writes
    one at a time, so at start none is live). Returns the removed paths."""
    removed = []
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(".ckpt-") and name.endswith(".tmp"):
                path = os.path.join(directory, name)
                try:
                    os.remove(path)
                    removed.append(path)
                except OSError:
                    pass
    return removed


def save_checkpoint(path: str, state: dict) -> None:
    """Writes ``state`` with torch.save to a temporary file beside ``path``, flushes it to
    the disk, renames it over ``path`` and flushes the directory: a crash or a kill at any
    point leaves either the old checkpoint or the new one, never a truncated file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({**state, "fastrobust_version": __version__}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location="cpu", kind: str | tuple | None = None) -> dict:
    """A checkpoint written by `save_checkpoint`; a missing, truncated or foreign file is a
    CheckpointError of one line naming the file. ``kind``: the run kind(s) it must be."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any reader failure means a damaged file
        size = os.path.getsize(path)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({size} bytes; "
                              f"{type(e).__name__}: {why[:160]})") from None
    if not isinstance(ck, dict) or "config" not in ck:
        raise CheckpointError(f"{path} is not a fastrobust trainer checkpoint (no run "
                              "configuration in it)")
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        if ck.get("kind") not in kinds:
            raise CheckpointError(f"{path} is a {ck.get('kind')!r} checkpoint, expected "
                                  f"{' or '.join(map(repr, kinds))}")
    return ck


def require_entries(ck: dict, path: str, *entries: str) -> None:
    """Each entry (``"rng"``, or ``"rng.data"`` inside it) is in the checkpoint, else a
    CheckpointError naming the first one missing; called before anything is restored, so a
    refused checkpoint leaves the trainer as it was."""
    for entry in entries:
        node, parts = ck, entry.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                missing = ".".join(parts[:i + 1])
                raise CheckpointError(f"{path} has no {missing!r} entry, so it cannot be "
                                      "restored (a damaged checkpoint, or not one a "
                                      "fastrobust trainer wrote)")
            node = node[part]


def unknown_options(cls, saved: dict, path: str) -> str | None:
    """The warning for the options in a checkpoint's config ``saved`` that ``cls`` (this
    version's config) does not have, which are ignored; None when there are none."""
    names = sorted(k for k in saved if k not in cls.__dataclass_fields__)
    if not names:
        return None
    listed = ", ".join(f"{k!r} ({saved[k]!r})" for k in names)
    return (f"{path}: ignoring option{'s' if len(names) > 1 else ''} {listed} of the run's "
            "configuration, which this version of fastrobust does not know")


def load_weights(model: torch.nn.Module, path: str, ck: dict) -> None:
    """The checkpoint's weights into ``model``, or one line saying why they do not fit."""
    require_entries(ck, path, "model")
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else ""
        raise CheckpointError(
            f"{path}: its weights do not fit the model built from this configuration "
            f"({len(lines) - 1} mismatches; first: {detail[:200]})") from None


def check_finite(loss_sum: float, where: str, checkpoint: str | None) -> None:
    if not math.isfinite(loss_sum):
        raise TrainingDiverged(f"the training loss became {loss_sum} {where}; stopped. "
                               f"{_kept(checkpoint)}. Lower the learning rate or check the "
                               "data.")


def _kept(checkpoint: str | None) -> str:
    return (f"the last good checkpoint is {checkpoint}" if checkpoint and
            os.path.exists(checkpoint) else "no checkpoint was written yet")


def check_finite_weights(model: torch.nn.Module, where: str, checkpoint: str | None) -> None:
    """Every floating parameter and buffer of ``model`` is finite (one read back), else
    TrainingDiverged: the loss is computed before each step, so weights a last step made
    NaN would otherwise reach the checkpoint."""
    flags = [t.detach().isfinite().all() for t in
             list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if flags and not bool(torch.stack(flags).all()):
        bad = sum(int((~t.detach().isfinite()).sum()) for t in model.parameters()
                  if t.is_floating_point())
        raise TrainingDiverged(f"the weights became non-finite {where} ({bad} parameter "
                               f"values); stopped. {_kept(checkpoint)}. Lower the learning "
                               "rate or check the data.")


# --- resume: the checkpoint's configuration is the run's ----------------------------------------

# Options that may differ on --resume without --override: where the run lives and runs, and
# how it is evaluated at the end; they do not change the training itself.
RESUME_FREE = ("out", "device", "data_root", "eval_steps", "deterministic")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


def resume_changes(saved: dict, cfg, given: set[str]) -> dict[str, tuple]:
    """The options the user gave (``given``) whose value differs from the checkpoint's run
    (``saved``: its config dict), as {field: (run's value, given value)}. ``epochs`` counts
    only when it shortens the run: a larger value extends it (see `replan_schedule`)."""
    changes = {}
    for field in sorted(given):
        if field in RESUME_FREE or field not in saved or not hasattr(cfg, field):
            continue
        old, new = saved[field], getattr(cfg, field)
        if field in ("epochs", "epochs2") and isinstance(new, int) and new >= old:
            continue
        if not _same(old, new):
            changes[field] = (old, new)
    return changes


def resumed_config(cls, saved: dict, cfg, given: set[str]):
    """The run's configuration on --resume: the checkpoint's, with the options the user gave
    applied (the caller has checked that those are allowed)."""
    fields = cls.__dataclass_fields__
    saved = getattr(cls, "upgrade_saved", dict)(dict(saved))  # an older version's defaults
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k in fields}
    kw.update({k: getattr(cfg, k) for k in given if k in fields})
    return cls(**kw)


def rescale_lr(opt: torch.optim.Optimizer, sched, ratio: float) -> None:
    """Multiplies the current and the base learning rate by ``ratio`` (an overridden --lr on
    resume): the schedule continues from the same point, at the new scale."""
    for group in opt.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    sched.base_lrs = [lr * ratio for lr in sched.base_lrs]


def replan_schedule(opt: torch.optim.Optimizer, make, done: int, total: int):
    """The schedule of a run whose length changed on resume: ``make(opt, total)`` (the
    trainer's kind of schedule) planned over the new length, advanced to epoch ``done``, and
    the optimizer's learning rate set to its value there. The rest of the run has exactly the
    learning rates of a run started with ``total`` epochs (a cosine decays from there to 0 at
    the new end, instead of climbing back up as the old one would past its end)."""
    base = [g.get("initial_lr", g["lr"]) for g in opt.param_groups]
    probe = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": b}
                             for b in base])
    ahead = make(probe, total)
    for _ in range(done):
        probe.step()
        ahead.step()
    for group, b, p in zip(opt.param_groups, base, probe.param_groups):
        group["initial_lr"], group["lr"] = b, p["lr"]
    sched = make(opt, total)
    sched.load_state_dict(ahead.state_dict())
    for group, p in zip(opt.param_groups, probe.param_groups):
        group["lr"] = p["lr"]
    return sched


def generator_state(g: torch.Generator) -> torch.Tensor:
    return g.get_state()


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def format_table(rows: list[dict], columns: Iterable[tuple[str, str, str]]) -> str:
    """rows of dicts → an aligned text table; columns: (key, header, format)."""
    columns = list(columns)
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-"
                      for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def distributed_context(device: str, enabled: bool | None = None):
    """(rank, world_size, device) of this process. Under ``torchrun`` (WORLD_SIZE > 1 in the
    environment) this initializes the default process group, NCCL for CUDA and gloo for the
    CPU, and picks cuda:LOCAL_RANK; a group initialized by the caller is used as it is.
    ``enabled=False`` forces a single process; None decides from the environment."""
    import torch.distributed as dist

    dev = torch.device(device)
    initialized = dist.is_available() and dist.is_initialized()
    if enabled is False or (not initialized and int(os.environ.get("WORLD_SIZE", "1")) <= 1):
        return 0, 1, dev
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not initialized:
        # torch._dynamo first: imported later (torch.compile, a dispatch mode), it imports
        # torch.distributed.nn, whose defaults `group=group.WORLD` would hold the group past
        # destroy_process_group, and gloo's threads would race the interpreter's exit.
        from torch import _dynamo  # noqa: F401
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


class BaseTrainer:
    """What every trainer shares: the fit loop (epochs, checkpoints, divergence stop, rank-0
    logging), rank bookkeeping (data-parallel under torchrun, see
    `distributed_context`: ``rank``, ``world``, ``device``, ``is_main``; a batch's slice for
    this rank; sums over the ranks; every rank's random state for the checkpoint), model
    placement, the weights' finiteness check, and resuming with changed options."""

    resumed_changes: dict = {}  # what the last resume changed, {field: (run's, new)}

    # -- the fit loop: a method provides next_epoch() and epoch_line(rec) ----------------------

    def next_epoch(self) -> dict | None:
        """Trains one epoch and advances the epoch counters; returns its record, or None when
        the run is complete."""
        raise NotImplementedError

    def epoch_line(self, rec: dict) -> tuple[str, str]:
        """(where, log line) of an epoch's record: "after epoch 3" for errors, the line rank 0
        prints."""
        raise NotImplementedError

    def fit(self, log=print) -> list[dict]:
        """Trains until the configured epochs are done. After every epoch: the weights'
        finiteness check (a diverged run stops with the previous checkpoint kept), the
        checkpoint (every rank builds the state, a collective under DDP; rank 0 writes it) and
        one log line from rank 0. Returns the history of epoch records."""
        while (rec := self.next_epoch()) is not None:
            self.history.append(rec)
            where, line = self.epoch_line(rec)
            self._check_weights(where)
            state = self.state()
            if self.is_main:
                save_checkpoint(self.checkpoint, state)
                log(line)
        return self.history

    def _clean_out(self) -> None:
        """Removes the temporary files a run killed mid-write left in its directory."""
        if self.is_main:
            remove_stale_temporaries(os.path.dirname(os.path.abspath(self.checkpoint)))

    def _check_weights(self, where: str) -> None:
        check_finite_weights(self.model, where, getattr(self, "checkpoint", None))

    def _load_weights(self, path: str, ck: dict) -> None:
        """The checkpoint's weights into the model, or one line saying why they do not fit."""
        load_weights(self.model, path, ck)

    def _apply_resume(self, saved: dict, schedules) -> None:
        """After a checkpoint is loaded: the options the caller changed against ``saved`` (the
        checkpoint's config) take effect. ``schedules``: (epochs field, lr field, optimizer
        attribute, scheduler attribute, epochs done, maker) per training stage; a changed lr
        rescales the stage's schedule from where it is, another epoch count re-plans it over
        the new length (`replan_schedule`). The changes are kept in ``resumes``."""
        changed = {}
        for epochs_field, lr_field, opt_name, sched_name, done, make in schedules:
            opt, sched = getattr(self, opt_name), getattr(self, sched_name)
            old_lr, new_lr = saved.get(lr_field), getattr(self.cfg, lr_field)
            old_e, new_e = saved.get(epochs_field), getattr(self.cfg, epochs_field)
            if old_lr is not None and not _same(old_lr, new_lr):
                if old_lr:
                    rescale_lr(opt, sched, new_lr / old_lr)
                else:  # a run at lr 0 (older versions took it): no scale to multiply
                    for group in opt.param_groups:
                        group["initial_lr"] = new_lr
                    setattr(self, sched_name, replan_schedule(opt, make, done, new_e))
                changed[lr_field] = (old_lr, new_lr)
            if old_e is not None and new_e != old_e:
                setattr(self, sched_name, replan_schedule(opt, make, done, new_e))
                changed[epochs_field] = (old_e, new_e)
        for field in self.cfg.__dataclass_fields__:
            if field in saved and field not in changed and field not in RESUME_FREE and \
                    not _same(saved[field], getattr(self.cfg, field)):
                changed[field] = (saved[field], getattr(self.cfg, field))
        self.resumed_changes = changed
        if changed:
            self.resumes.append({"after_epoch": self.history[-1].get("epoch")
                                 if self.history else 0,
                                 "changes": {k: list(v) for k, v in changed.items()}})

    def _setup_ranks(self, device: str, distributed: bool | None, batch_size: int,
                     deterministic: bool = False) -> None:
        if deterministic:  # before any kernel runs (cuBLAS reads its setting once)
            use_deterministic(device)
        self.rank, self.world, self.device = distributed_context(device, distributed)
        self.is_main = self.rank == 0
        if batch_size < self.world:
            raise ValueError(f"batch_size {batch_size} is the global batch; it must be at "
                             f"least the number of ranks ({self.world})")

    def _place(self, model: torch.nn.Module, memory_format: str | bool | None,
               sync_bn: bool) -> torch.nn.Module:
        """``model`` on the device in the memory format of `fastrobust.memory_format.choose`
        ("auto": channels_last on the CPU unless a torch CPU bug could hit the model's
        convolutions; sets ``memory_format`` for the batches), its multi-branch BNs
        synchronized under DDP."""
        from ..memory_format import choose

        model.to(self.device)
        self.memory_format = choose(model, self.device, memory_format)
        if self.memory_format == torch.channels_last:
            model.to(memory_format=self.memory_format)
        if self.world > 1 and sync_bn:
            from ..nn import convert_sync_multi_bn
            convert_sync_multi_bn(model)
        return model

    def autocast(self):
        """The context of a training step's forward passes and attacks: bf16 autocast with
        --precision bf16 (the BN ops then take bf16 activations with fp32 parameters and
        statistics), else nothing."""
        if getattr(self.cfg, "precision", "fp32") == "bf16":
            return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _part(self, n: int) -> slice:
        """This rank's contiguous slice of a global batch of n samples."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t

    def _gather(self, obj) -> list:
        """Every rank's ``obj`` (a collective under DDP)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _ddp(self, module: torch.nn.Module, sync_bn: bool) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (its parameters that require grad now);
        synchronized BNs keep the buffers equal on every rank, so none are broadcast per
        forward (the keyword was renamed in newer torch)."""
        import inspect

        from torch.nn.parallel import DistributedDataParallel
        kw = ("forward_sync_buffers" if "forward_sync_buffers" in
              inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
        return DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            **{kw: not sync_bn})

    def close(self) -> None:
        """Waits for every rank, lets go of the DDP wrappers (their reducers hold the group)
        and ends the process group (under DDP)."""
        if self.world > 1:
            import gc

            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel
            dist.barrier()
            for name, value in list(vars(self).items()):
                if isinstance(value, DistributedDataParallel):
                    setattr(self, name, value.module)
            gc.collect()
            dist.destroy_process_group()
