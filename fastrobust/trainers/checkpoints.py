"""Checkpoints: atomic writes, reads that fail in one line, and resuming a run from one with
the options the user changed (``--resume``, ``--override``)."""
from __future__ import annotations

import os
import tempfile

import torch

from .. import __version__


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or from another kind of run (one line)."""


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


# -- resume: the checkpoint's configuration is the run's --------------------------------------

# Options that may differ on --resume without --override: where the run lives and runs, and
# how it is evaluated at the end; they do not change the training itself.
RESUME_FREE = ("out", "device", "data_root", "eval_steps", "deterministic")


def same_value(a, b) -> bool:
    """A config value as saved in a checkpoint (lists for tuples) equals the given one."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
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
        if not same_value(old, new):
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
