"""What every trainer shares: atomic checkpoints with the random-number state (so ``--resume``
continues a run exactly), the divergence check, the λ/width sweep table, JSON results and
plots."""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Iterable

import torch

from .. import __version__


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def save_checkpoint(path: str, state: dict) -> None:
    """Writes ``state`` with torch.save to a temporary file beside ``path`` and renames it
    over ``path``: a crash mid-write never leaves a truncated checkpoint."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({**state, "fastrobust_version": __version__}, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def check_finite(loss_sum: float, where: str, checkpoint: str | None) -> None:
    if not math.isfinite(loss_sum):
        kept = (f"the last good checkpoint is {checkpoint}" if checkpoint and
                os.path.exists(checkpoint) else "no checkpoint was written yet")
        raise TrainingDiverged(f"the training loss became {loss_sum} {where}; stopped. {kept}. "
                               "Lower the learning rate or check the data.")


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


def plot_tradeoff(path: str, curves: dict[str, list[dict]], title: str) -> None:
    """The SA–RA trade-off: one curve per label (e.g. per width), points annotated with λ;
    seen λ values as circles, unseen ones as stars. Beside it SA and RA against λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["lambda"])
        line, = ax.plot([r["RA"] * 100 for r in rows], [r["SA"] * 100 for r in rows], "-",
                        alpha=0.5, label=label)
        for r in rows:
            ax.plot(r["RA"] * 100, r["SA"] * 100, "o" if r["seen"] else "*",
                    color=line.get_color(), markersize=6 if r["seen"] else 9)
            ax.annotate(f"{r['lambda']:g}", (r["RA"] * 100, r["SA"] * 100), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        lams = [r["lambda"] for r in rows]
        ax2.plot(lams, [r["SA"] * 100 for r in rows], "o-", color=line.get_color(),
                 label=f"SA {label}")
        ax2.plot(lams, [r["RA"] * 100 for r in rows], "s--", color=line.get_color(),
                 label=f"RA {label}")
    ax.set_xlabel("robust accuracy (%)")
    ax.set_ylabel("standard accuracy (%)")
    ax.set_title("SA–RA trade-off (o seen λ, * unseen λ)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.set_xlabel("λ")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("accuracy against λ")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


class DataParallel:
    """Rank bookkeeping shared by the trainers (data-parallel under torchrun, see
    `distributed_context`): ``rank``, ``world``, ``device``, ``is_main``; a batch's slice for
    this rank; sums over the ranks; every rank's random state for the checkpoint."""

    def _setup_ranks(self, device: str, distributed: bool | None, batch_size: int) -> None:
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
