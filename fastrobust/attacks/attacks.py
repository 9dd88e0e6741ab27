"""PGD, FGSM and MI-FGSM on the fused steps of `fastrobust.functional`.

Every attack runs the model in eval mode and restores each submodule's mode afterwards; it
turns ``requires_grad`` off on the model's parameters for the attack (restored after) and takes
input gradients with `torch.autograd.grad`, so parameter gradients are neither computed nor
left in `.grad`. The step loop has no host sync: eps and alpha may be per-sample tensors
and nothing is read back to the host.

Attacks (and evaluations) on one model from several threads at once share that state: the
model stays in eval mode with its parameters frozen until the last of them ends, which
restores each module's mode and each parameter's flag as they were before the first began.
Their routing (``branch=``, ``mix=``) is per thread (`fastrobust.nn.routing`).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as FF
from ..memory_format import cpu_channels_last_hazard
from ..nn import routing

_FORMATS = {None, torch.contiguous_format, torch.channels_last, torch.preserve_format}
_call = threading.local()  # .route: this thread's (branch, mix, context) of the running call
MAX_GRAPHS = 2  # captured attack steps kept per attack object (see PGD)


def cw_loss(logits: Tensor, y: Tensor, kappa: float = 0.0) -> Tensor:
    """Carlini–Wagner margin loss for linf PGD ("CW∞"): mean of −clamp(z_y − max_{j≠y} z_j,
    min=−kappa). Ascending it pushes the true logit below the best other one; with kappa = 0
    a sample stops moving once it is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return -(true - other).clamp(min=-kappa).mean()


def _ce_sum(logits: Tensor, y: Tensor) -> Tensor:
    """The cross-entropy summed over the batch (the OAT repository's attack loss: its sign
    steps equal the mean's, but no sample's gradient is divided by N before the sign)."""
    return F.cross_entropy(logits, y, reduction="sum")


# Modules and parameters held by the eval_mode / frozen_parameters bodies running now, in any
# thread: {object: [number of bodies holding it, its own flag before the first one]}.
_HELD_LOCK = threading.Lock()
_EVAL_HELD: dict = {}
_FROZEN_HELD: dict = {}


@contextlib.contextmanager
def _hold(objects, held: dict, flag, set_flag):
    """``set_flag(o, False)`` on every object for the body; each object's own ``flag(o)`` is
    restored when the last body holding it (in any thread) ends, also on an exception."""
    objects = list(objects)
    with _HELD_LOCK:
        for o in objects:
            entry = held.get(o)
            if entry is None:
                held[o] = [1, flag(o)]
                set_flag(o, False)
            else:
                entry[0] += 1
    try:
        yield
    finally:
        with _HELD_LOCK:
            for o in objects:
                entry = held[o]
                entry[0] -= 1
                if entry[0] == 0:
                    del held[o]
                    set_flag(o, entry[1])


def _set_training(m: nn.Module, mode: bool) -> None:
    m.training = mode


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Every submodule in eval mode for the body, then each one's own mode restored. Bodies
    overlapping on a module (nested, or in other threads) keep it in eval mode until the last
    one ends, which restores the mode it had before the first."""
    with _hold(model.modules(), _EVAL_HELD, lambda m: m.training, _set_training):
        model.eval()  # as well: a module's own train() may do more than set its flag
        yield model


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """requires_grad off on every parameter of ``model`` for the body, then each restored: the
    backward of an attack computes input gradients only. Overlapping bodies (other threads)
    share the freeze as `eval_mode` does."""
    with _hold(model.parameters(), _FROZEN_HELD, lambda p: p.requires_grad,
               lambda p, flag: p.requires_grad_(flag)):
        yield model


class Attack:
    """Base class: the shared call signature, conditioning and bookkeeping.

    ``atk(x, y, *, eps=None, branch=None, mix=None, context=None, **forward_kwargs)``:

    - ``eps``: overrides the attack's eps for this call (float or per-sample ``[N]``);
    - ``branch`` / ``mix``: routes every multi-branch BN of the model for the whole attack
      (``fastrobust.nn.routing``), e.g. ``branch=1`` for OAT's adversarial branch;
    - ``context``: any context manager entered once around the attack (e.g. a model's
      FiLM condition, computed once rather than in every step);
    - ``forward_kwargs``: passed to ``model(x, **forward_kwargs)``.

    The result has x's memory format. ``memory_format``: the layout the model sees during the
    attack; None picks channels_last for 4-D inputs of at least 16×16 on the CPU (the CPU
    convolutions and their input gradients are much faster in it there; on smaller maps the
    per-call conversion of the weights to that layout costs more than it saves), unless the
    model has a convolution that torch's CPU channels_last bug could hit
    (`fastrobust.memory_format`), and keeps x's layout otherwise.
    """

    def __init__(self, model: nn.Module, eps=8 / 255, alpha=2 / 255, steps: int = 10, *,
                 random_start: bool = True, norm: str = "linf", loss: str | Callable = "ce",
                 clip_min: float = 0.0, clip_max: float = 1.0,
                 generator: torch.Generator | None = None, memory_format=None,
                 cuda_graph: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps}")
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if cuda_graph not in (None, True, False):
            raise TypeError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
        if memory_format not in _FORMATS:
            raise ValueError(f"memory_format must be None or a torch.memory_format, "
                             f"got {memory_format!r}")
        if isinstance(loss, str):
            if loss not in ("ce", "ce_sum", "cw"):
                raise ValueError(f"loss must be 'ce', 'ce_sum', 'cw' or a callable, got "
                                 f"{loss!r}")
            loss = {"ce": F.cross_entropy, "ce_sum": _ce_sum, "cw": cw_loss}[loss]
        self.model, self.eps, self.alpha, self.steps = model, eps, alpha, int(steps)
        self.random_start, self.norm, self.loss = random_start, norm, loss
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)
        self.generator, self.memory_format, self.cuda_graph = generator, memory_format, cuda_graph
        self._cl_safe = None

    def __repr__(self) -> str:
        eps = "per-sample" if isinstance(self.eps, Tensor) else f"{self.eps:.4g}"
        return (f"{type(self).__name__}(eps={eps}, steps={self.steps}, norm={self.norm!r}, "
                f"random_start={self.random_start})")

    # -- the call --------------------------------------------------------------------------
    def __call__(self, x: Tensor, y: Tensor, *, eps=None, branch=None, mix=None,
                 context=None, **forward_kwargs) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
            raise TypeError("x must be a floating-point [N, ...] tensor")
        if not isinstance(y, Tensor) or y.shape[:1] != x.shape[:1]:
            raise ValueError(f"y must be a [N] tensor with N = {x.shape[0]}")
        eps = self.eps if eps is None else eps
        with contextlib.ExitStack() as stack:
            stack.enter_context(eval_mode(self.model))
            stack.enter_context(frozen_parameters(self.model))
            if branch is not None or mix is not None:
                stack.enter_context(routing(self.model, branch=branch, mix=mix))
            if context is not None:
                stack.enter_context(context)
            x_nat = self._layout(x.detach())
            if x_nat is x:
                x_nat = x.detach()
            saved, _call.route = getattr(_call, "route", None), (branch, mix, context)
            try:
                x_adv = self._attack(x_nat, y, eps, forward_kwargs).detach()
            finally:
                _call.route = saved
        if x_adv.stride() != x.stride():
            x_adv = torch.empty_like(x).copy_(x_adv)
        return x_adv

    def _layout(self, x: Tensor) -> Tensor:
        fmt = self.memory_format
        if fmt is None:  # see the class docstring
            big = x.dim() == 4 and x.shape[-1] * x.shape[-2] >= 256
            fmt = None
            if big and x.device.type == "cpu":
                if self._cl_safe is None:  # the model's convs, checked once per attack object
                    self._cl_safe = cpu_channels_last_hazard(self.model) is None
                fmt = torch.channels_last if self._cl_safe else None
        if fmt in (None, torch.preserve_format):
            return x
        return x.contiguous(memory_format=fmt)

    def _gradient(self, x_adv: Tensor, y: Tensor, kw: dict) -> Tensor:
        with torch.enable_grad():
            loss = self.loss(self.model(x_adv, **kw), y)
            return torch.autograd.grad(loss, x_adv)[0]

    def _start(self, x_nat: Tensor, eps) -> Tensor:
        if self.random_start:
            x_adv = FF.pgd_init(x_nat, eps, norm=self.norm, clip_min=self.clip_min,
                                clip_max=self.clip_max, generator=self.generator)
        else:
            x_adv = x_nat.clone()
        return x_adv.requires_grad_(True)

    def _step_size(self, eps):
        return self.alpha

    def _attack(self, x_nat: Tensor, y: Tensor, eps, kw: dict) -> Tensor:
        raise NotImplementedError


class PGD(Attack):
    """Projected gradient descent (Madry et al.), torchattacks' ``PGD`` / ``PGDL2``:
    ``PGD(model, eps=8/255, alpha=2/255, steps=10, random_start=True, norm="linf",
    loss="ce")``; ``loss="cw"`` gives CW∞ (PGD on the margin loss), ``loss="ce_sum"`` the
    summed cross-entropy (the OAT repository's attack loss). Each step is one fused
    in-place kernel. On CUDA inputs (``cuda_graph=None``, the default, or True) the first
    step runs eagerly, the second is captured in a CUDA graph, and the graph is replayed for
    every step after the first: the host issues one replay per step instead of the model's
    forward and backward (on an H200 at 858ad8d this halved a ResNet-18 OAT step, 211 -> 109
    ms). The captured step is kept for the next call with the same shapes, float values,
    routing kind and model storage (inputs copied into its static buffers; at most
    MAX_GRAPHS per attack object), so an attack per training batch captures once.
    ``cuda_graph=False`` runs every step eagerly; True on CPU inputs is an error."""

    def _attack(self, x_nat, y, eps, kw):
        x_adv = self._start(x_nat, eps)
        graphed = (x_adv.device.type == "cuda") if self.cuda_graph is None else self.cuda_graph
        if graphed and self.steps > 1:
            return self._graphed(x_adv, x_nat, y, eps, kw)
        alpha = self._step_size(eps)
        for _ in range(self.steps):
            grad = self._gradient(x_adv, y, kw)
            FF.pgd_step_(x_adv, grad, x_nat, eps, alpha, norm=self.norm,
                         clip_min=self.clip_min, clip_max=self.clip_max)
        return x_adv

    def _graphed(self, x_adv, x_nat, y, eps, kw):
        if x_adv.device.type != "cuda":
            raise RuntimeError("cuda_graph=True needs CUDA inputs; got "
                               f"{x_adv.device.type} tensors")
        return self._graph_steps(x_adv, x_nat, y, eps, kw, _CudaGraphs)

    def _graph_steps(self, x_adv, x_nat, y, eps, kw, api):
        """The attack's steps as replays of one captured step. The step is captured on static
        copies of its inputs (x_adv, x_nat, y, per-sample eps / alpha, routing, the tensors
        of the forward's keyword arguments), and kept for the next call with the same
        signature (shapes, dtypes, strides, float values, routing kind, the model's parameter
        and buffer storage, autocast): that call copies its inputs in and replays the graph
        once per step. A new signature runs one eager step (kernels compiled, launch plans
        recorded outside the capture), captures the next and replays it. At most MAX_GRAPHS
        are kept per attack object; a call with a `context` is never cached (its tensors are
        unknown here)."""
        alpha = self._step_size(eps)
        branch, mix, context = getattr(_call, "route", None) or (None, None, None)
        key = _graph_key(self, x_adv, y, eps, alpha, branch, mix, context, kw)
        cache = self.__dict__.setdefault("_graphs", {})
        entry = cache.get(key) if key is not None else None
        if entry is not None:
            cache[key] = cache.pop(key)  # most recently used last
            with torch.no_grad():
                for dst, src in zip(entry["static"], _graph_inputs(x_adv, x_nat, y, eps, alpha,
                                                                   branch, mix, kw)):
                    dst.copy_(src)
            for _ in range(self.steps):
                api.replay(entry["graph"])
            return entry["x_adv"].detach().clone()
        sx = x_adv.detach().clone().requires_grad_(x_adv.requires_grad)
        sn, sy = x_nat.clone(), y.clone()
        s_eps, s_alpha = (t.clone() if isinstance(t, Tensor) else t for t in (eps, alpha))
        s_branch, s_mix = (t.clone() if isinstance(t, Tensor) else t for t in (branch, mix))
        s_kw = {k: v.clone() if isinstance(v, Tensor) else v for k, v in kw.items()}

        def step():
            grad = self._gradient(sx, sy, s_kw)
            FF.pgd_step_(sx, grad, sn, s_eps, s_alpha, norm=self.norm,
                         clip_min=self.clip_min, clip_max=self.clip_max)

        with contextlib.ExitStack() as stack:
            if branch is not None or mix is not None:
                stack.enter_context(routing(self.model, branch=s_branch, mix=s_mix))
            api.eager(step)  # step 1
            graph = api.capture(step)  # recorded, not run (858ad8d counted it: one step short)
            for _ in range(self.steps - 1):  # steps 2 .. steps
                api.replay(graph)
        if key is not None:
            static = _graph_inputs(sx, sn, sy, s_eps, s_alpha, s_branch, s_mix, s_kw)
            cache[key] = {"graph": graph, "x_adv": sx, "static": static}
            while len(cache) > MAX_GRAPHS:
                cache.pop(next(iter(cache)))
        return sx.detach().clone()


def _tensor_key(t):
    return ("tensor", t.dtype, tuple(t.shape), tuple(t.stride()), t.device)


def _graph_key(atk, x_adv, y, eps, alpha, branch, mix, context, kw):
    """What a captured step depends on besides the values it reads (None: not cacheable)."""
    if context is not None:
        return None
    parts = [_tensor_key(x_adv), _tensor_key(y)]
    for v in (eps, alpha, branch, mix, *kw.values()):
        if isinstance(v, Tensor):
            parts.append(_tensor_key(v))
        elif v is None or isinstance(v, (bool, int, float, str)):
            parts.append((type(v).__name__, v))
        else:
            return None
    model = atk.model
    state = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    dev = x_adv.device.type
    autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) \
        if dev in ("cuda", "cpu") else None
    return (id(model), state, autocast, tuple(kw), atk.norm, atk.clip_min, atk.clip_max,
            atk.loss, tuple(parts))


def _graph_inputs(x_adv, x_nat, y, eps, alpha, branch, mix, kw):
    """The tensors a cached step reads, in a fixed order (copied into its static ones)."""
    return [t for t in (x_adv, x_nat, y, eps, alpha, branch, mix, *kw.values())
            if isinstance(t, Tensor)]


class _CudaGraphs:
    """The CUDA side of PGD's captured steps."""

    @staticmethod
    def eager(step):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)

    @staticmethod
    def capture(step):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph

    @staticmethod
    def replay(graph):
        graph.replay()


class FGSM(PGD):
    """Fast gradient sign method: one linf step of size eps from the clean input
    (torchattacks' ``FGSM``)."""

    def __init__(self, model: nn.Module, eps=8 / 255, **kw):
        kw.setdefault("random_start", False)
        super().__init__(model, eps=eps, alpha=eps, steps=1, **kw)

    def _step_size(self, eps):
        return eps  # one step of size eps, also when a call overrides eps


class MIFGSM(Attack):
    """Momentum iterative FGSM (Dong et al.), torchattacks' ``MIFGSM``: ``MIFGSM(model,
    eps=8/255, alpha=2/255, steps=10, decay=1.0)``; momentum and step in one fused kernel."""

    def __init__(self, model: nn.Module, eps=8 / 255, alpha=2 / 255, steps: int = 10,
                 decay: float = 1.0, *, random_start: bool = False, **kw):
        super().__init__(model, eps, alpha, steps, random_start=random_start, norm="linf", **kw)
        self.decay = float(decay)

    def _attack(self, x_nat, y, eps, kw):
        x_adv = self._start(x_nat, eps)
        momentum = torch.zeros_like(x_adv)
        for _ in range(self.steps):
            grad = self._gradient(x_adv, y, kw)
            FF.mifgsm_step_(x_adv, grad, momentum, x_nat, eps, self.alpha, self.decay,
                            clip_min=self.clip_min, clip_max=self.clip_max)
        return x_adv
