"""What every trainer shares: the fit loop with its divergence stop, rank bookkeeping under
DDP (`distributed_context`), model placement, and the setup and checkpoint entries every
method has."""
from __future__ import annotations

import collections
import contextlib
import gc
import inspect
import math
import os
import pickle

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import data as data_mod
from ..memory_format import choose
from ..nn import convert_sync_multi_bn
from .checkpoints import (RESUME_FREE, load_weights, remove_stale_temporaries, replan_schedule,
                          rescale_lr, same_value, save_checkpoint)
from .config import use_deterministic

# The trainers' own collectives (gloo) keep their work objects here, past the process group's
# end. gloo's worker thread drops its references to a finished work under the group's lock,
# and a barrier's work holds the works queued before it: the last reference to a work whose
# tensors have Python objects, dropped there, needs the GIL. A process that destroys the group
# meanwhile holds the GIL and waits for that lock, and hangs for good (seen in
# tests/test_distributed.py: gloo's thread in ~AsyncBarrierWork → ~AsyncAllgatherWork, waiting
# for the GIL; the main thread in ~ProcessGroupGloo, waiting for the lock). With a reference
# held here, the worker thread's is never the last; the main thread drops it, collectives later.
_LIVE_WORKS: collections.deque = collections.deque(maxlen=16)


def _collective(fn, *args) -> None:
    """fn(*args) (a torch.distributed collective), waited for, its work kept in _LIVE_WORKS."""
    work = fn(*args, async_op=True)
    work.wait()
    _LIVE_WORKS.append((work, args))


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


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


def distributed_context(device: str, enabled: bool | None = None):
    """(rank, world_size, device) of this process. Under ``torchrun`` (WORLD_SIZE > 1 in the
    environment) this initializes the default process group, NCCL for CUDA and gloo for the
    CPU, and picks cuda:LOCAL_RANK; a group initialized by the caller is used as it is.
    ``enabled=False`` forces a single process; None decides from the environment."""
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

    # -- setup: a method's __init__ is _setup, its model and optimizers, then _start --------

    def _setup(self, cfg, progress: bool, distributed: bool | None) -> None:
        """What every trainer sets up before its model: the validated config, the ranks
        (and --deterministic), the data, the host generator (shuffling and per-sample draws,
        the same on every rank), this rank's attack generator (seed + 1 + rank), the history
        and the checkpoint path."""
        cfg.validate()
        self.cfg = cfg
        self._setup_ranks(cfg.device, distributed, cfg.batch_size, cfg.deterministic)
        self.progress = progress and self.is_main
        self.data = data_mod.load(cfg.dataset, cfg.data_root)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.attack_gen = torch.Generator(self.device).manual_seed(cfg.seed + 1 + self.rank)
        self.history: list[dict] = []
        self.resumes: list[dict] = []
        self.checkpoint = os.path.join(cfg.out, "last.pt")

    def _start(self, resume: bool) -> None:
        """After the model and optimizers are built: the temporaries a killed run left are
        removed, and with ``resume`` the checkpoint is loaded."""
        self._clean_out()
        if resume:
            self.load(self.checkpoint)

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the training forwards call: ``module`` in DDP under several ranks, else
        ``module`` itself."""
        return self._ddp(module, self.cfg.sync_bn) if self.world > 1 else module

    # -- the checkpoint entries every method has ------------------------------------------

    def _rng_state(self) -> dict:
        """The host generator's state and every rank's attack stream (a collective under
        DDP)."""
        return {"data": self.gen.get_state(),
                "attack_per_rank": self._gather(self.attack_gen.get_state())}

    def _restore(self, ck: dict) -> None:
        """The random streams, history and resumes of a checkpoint. Each rank takes its own
        attack stream when the run had as many ranks (a checkpoint with one stream, "attack",
        counts as one rank)."""
        self.gen.set_state(ck["rng"]["data"])
        per_rank = ck["rng"].get("attack_per_rank") or [ck["rng"]["attack"]]
        if len(per_rank) == self.world:
            self.attack_gen.set_state(per_rank[self.rank])
        self.history = ck["history"]
        self.resumes = ck.get("resumes", [])

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

    def _train_batches(self, desc: str, where: str, step, draw=None
                       ) -> tuple[torch.Tensor, int]:
        """One epoch's steps (model in train mode) over the shuffled training set, at most
        ``max_train_batches``. Per global batch of n samples: ``draw(n)``, what its step takes
        from the host generator per sample (drawn on every rank alike, also for a last batch
        too small to give every rank a sample, which is skipped); each rank steps on its
        slice, ``step(x, y, drawn, n)``, which returns its share of the batch's loss; every
        tenth loss is read (one host read) and checked (``where``: "at epoch 3" for the
        error). Returns every step's loss over the global batch (one collective per epoch
        under DDP) and the number of batches the epoch has."""
        cfg = self.cfg
        self.model.train()
        batches = data_mod.Batches(self.data.train, cfg.batch_size, shuffle=True,
                                   generator=self.gen)
        n_batches = len(batches) if not cfg.max_train_batches else min(len(batches),
                                                                       cfg.max_train_batches)
        bar = tqdm(total=n_batches, desc=desc, disable=not self.progress, leave=False)
        shares = []
        for i, (x, y) in enumerate(batches):
            if i == n_batches:
                break
            n = len(y)
            drawn = None if draw is None else draw(n)
            if n < self.world:
                continue
            if self.world > 1:  # this rank's slice of the batch and of what was drawn
                part = self._part(n)
                x, y = x[part], y[part]
                drawn = None if drawn is None else drawn[part]
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            share = step(x.contiguous(memory_format=self.memory_format), y, drawn, n)
            shares.append(share)
            bar.update(1)
            if i % 10 == 0 or i == n_batches - 1:
                value = float(self._all_sum(share.clone()))
                check_finite(value, f"{where}, batch {i + 1}", self.checkpoint)
                bar.set_postfix(loss=f"{value:.4f}")
        bar.close()
        losses = self._all_sum(torch.stack(shares)) if shares else torch.zeros(0)
        return losses, n_batches

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
            if old_lr is not None and not same_value(old_lr, new_lr):
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
                    not same_value(saved[field], getattr(self.cfg, field)):
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
        model.to(self.device)
        self.memory_format = choose(model, self.device, memory_format)
        if self.memory_format == torch.channels_last:
            model.to(memory_format=self.memory_format)
        if self.world > 1 and sync_bn:
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
            _collective(dist.all_reduce, t)
        return t

    def _gather(self, obj) -> list:
        """Every rank's ``obj`` (a collective under DDP): pickled bytes through two
        all-gathers whose works stay referenced (_collective; torch's all_gather_object drops
        them on return)."""
        if self.world == 1:
            return [obj]
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.long)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        _collective(dist.all_gather, sizes, size)
        n = max(int(s) for s in sizes)
        padded = torch.zeros(n, dtype=torch.uint8)
        padded[:data.numel()] = data
        outs = [torch.empty(n, dtype=torch.uint8) for _ in range(self.world)]
        _collective(dist.all_gather, outs, padded)
        return [pickle.loads(o[:int(s)].numpy().tobytes()) for o, s in zip(outs, sizes)]

    def _ddp(self, module: torch.nn.Module, sync_bn: bool) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (its parameters that require grad now);
        synchronized BNs keep the buffers equal on every rank, so none are broadcast per
        forward (the keyword was renamed in newer torch)."""
        kw = ("forward_sync_buffers" if "forward_sync_buffers" in
              inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
        return DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            **{kw: not sync_bn})

    def close(self) -> None:
        """Waits for every rank, lets go of the DDP wrappers (their reducers hold the group)
        and ends the process group (under DDP)."""
        if self.world > 1:
            _collective(dist.barrier)
            for name, value in list(vars(self).items()):
                if isinstance(value, DistributedDataParallel):
                    setattr(self, name, value.module)
            gc.collect()
            dist.destroy_process_group()
