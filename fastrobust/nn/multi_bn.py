"""Drop-in multi-branch batch norm modules (docs/ops.md)."""
from __future__ import annotations

import contextlib
import numbers
import threading

import torch
from torch import Tensor, nn

from .. import functional as F

__all__ = ["MultiBatchNorm2d", "MultiBatchNorm1d", "DualBatchNorm2d", "MixedBatchNorm2d",
           "FiLM", "ScaledConvBN", "routing"]

# The routing contexts open in each thread: {module: [[("branch" | "mix", value)], ...]}, one
# entry (a list: its identity) per open context, innermost last; a module's routing is its
# innermost open context's. Routing is per thread, so threads sharing one model each route
# their own calls.
_THREAD = threading.local()


# What the functions a module calls put first in their errors (the kernels' too).
_OP_NAMES = ("multi_batch_norm: ", "mixed_batch_norm: ")


def _in_words_of(who: str, err: Exception) -> Exception | None:
    """The error a module's op raised, naming the module class the user called instead of the
    function it called (`MultiBatchNorm2d: branch id 2 at sample 1 is out of range [0, 2)`);
    None for an error that names no such function."""
    msg = str(err)
    for name in _OP_NAMES:
        if msg.startswith(name):
            try:
                return type(err)(f"{who}: {msg[len(name):]}")
            except Exception:  # an exception type that takes other arguments: keep it
                return None
    return None


def _thread_routes() -> dict:
    routes = getattr(_THREAD, "routes", None)
    if routes is None:
        routes = _THREAD.routes = {}
    return routes


class MultiBatchNorm2d(nn.Module):
    """``nn.BatchNorm2d`` with K branches: sample n is normalized by branch ``branch[n]``.

    Parameters and buffers are ``[K, C]`` (``num_batches_tracked`` is ``[K]``: each branch
    counts the batches that updated it). Route a call explicitly with ``bn(x, branch=...)``, or
    every such module in a model at once with ``with routing(model, branch=...)``; ``branch``
    is an int64 ``[N]`` tensor or one int for the whole batch. A ``[C]`` state dict of a plain
    ``nn.BatchNorm2d`` loads into every branch.
    """

    def __init__(self, num_features: int, num_branches: int = 2, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        _check_num_branches(type(self).__name__, num_branches)
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.num_branches = num_features, num_branches
        self.eps, self.momentum = eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        shape = (num_branches, num_features)
        if affine:
            self.weight = nn.Parameter(torch.ones(shape, **kw))
            self.bias = nn.Parameter(torch.zeros(shape, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(shape, **kw))
            self.register_buffer("running_var", torch.ones(shape, **kw))
            self.register_buffer("num_batches_tracked",
                                 torch.zeros(num_branches, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    @property
    def _routing(self):
        """The routing of this module's calls in the current thread (``routing``), or None.
        Each thread sees only the contexts it opened itself."""
        routes = getattr(_THREAD, "routes", None)
        stack = routes.get(self) if routes else None
        return stack[-1][0] if stack else self.__dict__.get("_pinned_routing")

    def _replicate_for_data_parallel(self):
        # nn.DataParallel calls its replicas from worker threads: a replica keeps the routing
        # of the thread that made it (the caller's).
        replica = super()._replicate_for_data_parallel()
        replica.__dict__["_pinned_routing"] = self._routing
        return replica

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _route(self, x: Tensor, branch, mix):
        """("branch", int64 [N]) or ("mix", [N, K]) from the arguments or the routing context."""
        name, K, N = type(self).__name__, self.num_branches, x.shape[0]
        if branch is not None and mix is not None:
            raise ValueError(f"{name}: pass branch= or mix=, not both")
        if branch is None and mix is None and self._routing is not None:
            kind, value = self._routing
            branch, mix = (value, None) if kind == "branch" else (None, value)
        if mix is not None:
            if not isinstance(mix, Tensor):
                raise TypeError(f"{name}: mix must be a Tensor [N, {K}], got "
                                f"{type(mix).__name__}")
            if mix.shape != (N, K):
                raise ValueError(f"{name}: mix must be [N, {K}] = [{N}, {K}], got "
                                 f"{list(mix.shape)}")
            return "mix", mix
        if branch is None:
            if K == 1:
                branch = 0
            else:
                raise RuntimeError(
                    f"{name} has {K} branches but no routing: "
                    "call bn(x, branch=...) / bn(x, mix=...) or wrap the model call in "
                    "`with fastrobust.nn.routing(model, branch=...)`")
        if isinstance(branch, numbers.Integral) and not isinstance(branch, bool):
            branch = int(branch)  # numpy integers route like ints
            if not 0 <= branch < K:
                raise ValueError(f"{name}: branch {branch} is out of range [0, {K})")
            branch = torch.full((N,), branch, dtype=torch.long, device=x.device)
        elif not isinstance(branch, Tensor) or branch.dtype.is_floating_point or \
                branch.dtype.is_complex or branch.dtype == torch.bool:
            what = f"{branch.dtype} tensor" if isinstance(branch, Tensor) else \
                type(branch).__name__
            raise TypeError(f"{name}: branch must be an int or an int64 [N] tensor, got {what}")
        elif branch.shape != (N,):
            raise ValueError(f"{name}: branch must be an int or an int64 [N] = [{N}] tensor, "
                             f"got shape {list(branch.shape)}")
        return "branch", branch

    def __getstate__(self):
        # A copy (deepcopy, pickle: an EMA model, a checkpoint) taken inside `routing` must not
        # keep that routing: outside the context it would route silently.
        state = dict(super().__getstate__())
        state.pop("_routing", None)  # an attribute in pickles of older versions
        state.pop("_pinned_routing", None)
        return state

    # nn.BatchNorm2d's numbering: from version 2 on, num_batches_tracked is in the state dict.
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # As nn.BatchNorm2d: a state dict older than version 2 (or without a version: a plain
        # dict) may lack num_batches_tracked, in this module's [K, C] format or in a plain
        # BN's [C] one; the counters then keep their value (0 on a new module).
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and \
                key not in state_dict:
            own = self.num_batches_tracked
            state_dict[key] = own.clone() if own.device.type != "meta" else \
                torch.zeros(self.num_branches, dtype=torch.long)
        # A plain BatchNorm's [C] tensors (and scalar counter) load into every branch; a [C]
        # of another size is left to torch's size-mismatch error, which names the key.
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            key, own = prefix + name, getattr(self, name)
            if key in state_dict and own is not None and \
                    state_dict[key].dim() == own.dim() - 1 and \
                    tuple(state_dict[key].shape) == tuple(own.shape[1:]):
                state_dict[key] = state_dict[key].expand_as(own).clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    _DIMS = (4,)  # input dims the module takes (nn.BatchNorm2d's)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: x must be a Tensor, got "
                            f"{type(x).__name__}")
        if x.dim() not in self._DIMS:
            want = " or ".join(f"{d}D" for d in self._DIMS)
            raise ValueError(f"{type(self).__name__} expects {want} input, got {x.dim()}D "
                             f"input of shape {list(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}): x has "
                             f"{x.shape[1]} channels (shape {list(x.shape)}), expected "
                             f"{self.num_features}")

    def forward(self, x: Tensor, branch: Tensor | int | None = None, mix: Tensor | None = None,
                *, input_scale: Tensor | None = None, film_gamma: Tensor | None = None,
                film_beta: Tensor | None = None, activation: str | None = None) -> Tensor:
        self._check_input(x)
        kind, route = self._route(x, branch, mix)
        kw = dict(training=self.training,
                  momentum=self.momentum, eps=self.eps,
                  num_batches_tracked=self.num_batches_tracked, input_scale=input_scale,
                  film_gamma=film_gamma, film_beta=film_beta, activation=activation)
        try:
            if kind == "mix":
                return F.mixed_batch_norm(x, route, self.weight, self.bias, self.running_mean,
                                          self.running_var, **kw)
            return F.multi_batch_norm(x, route, self.weight, self.bias, self.running_mean,
                                      self.running_var, num_branches=self.num_branches, **kw)
        except (TypeError, ValueError, RuntimeError) as e:
            renamed = _in_words_of(type(self).__name__, e)
            if renamed is None:
                raise
            raise renamed from None

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_branches={self.num_branches}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class MixedBatchNorm2d(MultiBatchNorm2d):
    """Soft-mixed multi-branch BN (AW-Net's MixBN, AFA's two-branch weight-generator BN):
    ``bn(x, mix=m)`` is y_n = Σ_k m[n, k]·BN_k(x)_n in one fused pass (DESIGN §2.2); in
    training the branch statistics are mix-weighted over the batch. It also takes hard
    routing, ``bn(x, branch=b)``, as AW-Net does in training, where the sample type is known.
    Defaults to two branches."""

    def __init__(self, num_features: int, num_branches: int = 2, **kwargs):
        super().__init__(num_features, num_branches, **kwargs)


class DualBatchNorm2d(MultiBatchNorm2d):
    """Dual BN (OAT, AW-Net): branch ``CLEAN`` = 0 for clean samples, ``ADV`` = 1 for
    adversarial ones."""

    CLEAN, ADV = 0, 1

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, 2, **kwargs)


class MultiBatchNorm1d(MultiBatchNorm2d):
    """:class:`MultiBatchNorm2d` for ``nn.BatchNorm1d``'s inputs, ``[N, C]`` or ``[N, C, L]``
    (statistics over the samples, and L)."""

    _DIMS = (2, 3)


def _check_num_branches(who: str, num_branches) -> None:
    """num_branches must be an int >= 1; ``who``: the class or function the user called."""
    if isinstance(num_branches, bool) or not isinstance(num_branches, numbers.Integral):
        raise TypeError(f"{who}: num_branches must be an int, got "
                        f"{type(num_branches).__name__}")
    if num_branches < 1:
        raise ValueError(f"{who}: num_branches must be >= 1, got {num_branches}")


@contextlib.contextmanager
def routing(model: nn.Module, branch: Tensor | int | None = None, mix: Tensor | None = None):
    """Routes every multi-branch BN inside ``model`` for the calls in the body::

        with routing(model, branch=is_adv.long()):      # hard: sample n → branch[n]
            logits = model(x)
        with routing(model, mix=torch.stack([1 - p, p], 1)):   # soft: Σ_k mix[n,k]·BN_k
            logits = model(x)

    ``branch`` is an int64 ``[N]`` tensor or one int for the whole batch; ``mix`` is ``[N, K]``.
    Contexts nest: a module follows the innermost context still open around it, and exiting
    a context removes its own routing only, in whatever order contexts are exited (an
    ``ExitStack``, or enter a, enter b, exit a, exit b: b's routing holds until b exits, and
    after the last exit the model is unrouted). A copy of the model taken in the body
    (``copy.deepcopy``, pickling) does not keep the routing.

    Routing is per thread: threads sharing a model each route their own calls, in any
    interleaving of their contexts, and calls from a thread outside any context are not
    routed.
    """
    mods = [m for m in model.modules() if isinstance(m, MultiBatchNorm2d)]
    if not mods:
        raise ValueError("routing(): the model has no multi-branch batch norm; "
                         "convert it first with fastrobust.nn.convert_multi_bn(model)")
    if (branch is None) == (mix is None):
        raise ValueError("routing(): pass exactly one of branch= and mix=")
    if mix is not None and not isinstance(mix, Tensor):
        raise TypeError(f"routing(): mix must be a Tensor [N, K], got {type(mix).__name__}")
    if branch is not None and (isinstance(branch, bool) or
                               not isinstance(branch, (Tensor, numbers.Integral))):
        raise TypeError("routing(): branch must be an int or an int64 [N] tensor, got "
                        f"{type(branch).__name__}")
    value = ("branch", branch) if mix is None else ("mix", mix)
    routes = _thread_routes()
    entry = [value]  # this context's entry (found by identity, whatever the order of exits)
    for m in mods:
        routes.setdefault(m, []).append(entry)
    try:
        yield model
    finally:
        for m in mods:
            stack = [e for e in routes.get(m, ()) if e is not entry]
            if stack:
                routes[m] = stack
            else:
                routes.pop(m, None)


class FiLM(nn.Module):
    """Feature-wise linear modulation from a condition vector, in the OAT repository's form: a
    two-layer MLP ``cond_dim → hidden → 2·C`` with a LeakyReLU between, whose output halves
    pass through a LeakyReLU too: γ = leaky_relu(μ), β = leaky_relu(σ) (``activation=None``
    uses the raw halves). ``film(x, cond)`` returns γ·x + β through the fused op.

    After a batch norm, pass them to the BN instead, one pass for BN → FiLM → ReLU::

        gamma, beta = film.gamma_beta(cond)        # once per forward, not per PGD step
        y = bn(x, branch=b, film_gamma=gamma, film_beta=beta, activation="relu")

    ``cond`` is ``[N, cond_dim]`` (per sample) or ``[cond_dim]`` (one condition for the batch).
    The layers start with ``nn.Linear``'s default initialisation (the repository's);
    ``identity_init=True`` starts the last layer at γ = 1, β = 0 instead, so inserting FiLM
    into a trained model changes nothing until it trains. ``hidden`` defaults to 2·C.
    """

    def __init__(self, num_features: int, cond_dim: int, hidden: int | None = None,
                 negative_slope: float = 0.01, identity_init: bool = False,
                 activation: str | None = "leaky_relu", device=None, dtype=None):
        super().__init__()
        if activation not in ("leaky_relu", None):
            raise ValueError(f"activation must be 'leaky_relu' or None, got {activation!r}")
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.cond_dim = num_features, cond_dim
        self.activation, self.negative_slope = activation, negative_slope
        hidden = hidden or 2 * num_features
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden, **kw),
                                 nn.LeakyReLU(negative_slope),
                                 nn.Linear(hidden, 2 * num_features, **kw))
        if identity_init:
            with torch.no_grad():
                self.mlp[2].weight.zero_()
                self.mlp[2].bias.copy_(torch.cat([torch.ones(num_features),
                                                  torch.zeros(num_features)]))

    def gamma_beta(self, cond: Tensor, index: Tensor | None = None,
                   channels: int | None = None) -> tuple[Tensor, Tensor]:
        """(γ, β), each ``[N, C]`` (or ``[C]`` for a ``[cond_dim]`` condition). ``index``
        (int64 ``[M]``): ``cond`` holds distinct conditions and sample m gets those of
        ``cond[index[m]]``; the MLP runs once per distinct condition and one gather serves γ
        and β. ``channels`` < C: the slimmable sub-MLP of a narrower width (OATS, as the
        repository's slimmable FiLM): the first ``hidden·channels/C`` hidden units and the
        first ``2·channels`` outputs, split in half."""
        if cond.shape[-1] != self.cond_dim:
            raise ValueError(f"FiLM expects a condition of size {self.cond_dim} in its last "
                             f"dimension, got {list(cond.shape)}")
        c = self.num_features if channels is None else channels
        if c == self.num_features:
            out = self.mlp(cond)
        else:
            if not 0 < c < self.num_features:
                raise ValueError(f"channels must be in [1, {self.num_features}], got {c}")
            first, act, last = self.mlp
            hidden = first.out_features * c // self.num_features
            h = act(torch.nn.functional.linear(cond, first.weight[:hidden],
                                               first.bias[:hidden]))
            out = torch.nn.functional.linear(h, last.weight[:2 * c, :hidden], last.bias[:2 * c])
        if self.activation == "leaky_relu":
            out = torch.nn.functional.leaky_relu(out, self.negative_slope)
        if index is not None:
            # A gather whose backward is deterministic (#31): ``out[index]``'s backward is an
            # accumulating index_put_, which on the CPU adds rows with float atomics from
            # several threads once [N, 2C] has 2**15 values (a 128-sample batch at C >= 128),
            # so the MLP's gradient changed in its last bits from run to run. The embedding
            # backward sums each row's samples in index order on the CPU (on CUDA without
            # atomics either), and took 1.4-7x less time at OAT's shapes.
            out = torch.nn.functional.embedding(index, out)
        return out[..., :c], out[..., c:]

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        gamma, beta = self.gamma_beta(cond)
        return F.film(x, gamma, beta)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, cond_dim={self.cond_dim}, "
                f"activation={self.activation!r}")


class ScaledConvBN(nn.Module):
    """A bias-free conv followed by a multi-branch BN, with AW-Net's per-sample filter
    scaling: ``forward(x, omega)`` equals ``bn(conv_with_filters_scaled_by(omega[n])(x[n]))``
    for every sample, computed as conv → one fused BN pass whose input scale is ω
    (conv(x, ω⊙W) = ω[c]·conv(x, W), DESIGN §2.4); no per-sample weights and the scaled
    conv output is never written to memory. Routing (``branch=``, ``mix=``, or the
    ``routing`` context) and the other fused extras pass through to the BN.
    """

    def __init__(self, conv: nn.Conv2d, bn: MultiBatchNorm2d):
        super().__init__()
        if conv.bias is not None:
            raise ValueError("ScaledConvBN needs a bias-free conv: with a bias, scaling the "
                             "filters is not a scale of the output")
        if conv.out_channels != bn.num_features:
            raise ValueError(f"conv has {conv.out_channels} output channels but the BN "
                             f"normalizes {bn.num_features}")
        self.conv, self.bn = conv, bn

    def forward(self, x: Tensor, omega: Tensor | None = None, **bn_kwargs) -> Tensor:
        return self.bn(self.conv(x), input_scale=omega, **bn_kwargs)
