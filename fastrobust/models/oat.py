"""OAT-form CIFAR ResNets and Wide-ResNets: λ-conditioned FiLM after the block BNs and dual BN
routed by λ (λ = 0 → the clean branch, λ ≠ 0 → the adversarial one), both through the fused
`multi_batch_norm` (BN → FiLM → ReLU is one op).

    model = oat_resnet18(num_classes=10)
    with model.conditioned(lam):            # lam: a float or a per-sample [N] tensor
        logits = model(x)                   # γ, β computed once here, not in every PGD step
    logits = model(x, lam)                  # the same, for one call

The condition and the width are per thread, like `fastrobust.nn.routing`: threads sharing one
model each run with the λ and width of their own ``conditioned`` / ``at_width``.

OATS (``width_mults=(0.5, 0.75, 1.0)``): the same network, slimmable: every conv and the
classifier use the first ``round(w·C)`` channels of their weights at width ``w``, each width
has its own dual BNs (switchable BN), the FiLM MLPs are shared: at width ``w`` each runs its
slimmable sub-MLP (the repository's form; the "identity" variant slices the full γ, β).

    model = oats_resnet34(width_mults=(0.5, 0.75, 1.0))
    with model.at_width(0.5), model.conditioned(lam):
        logits = model(x)

The encoding of λ (OAT's appendix E): the j-th value of the training set of λs maps to row j of
a random orthogonal matrix (default, 128-d: the repository's ``rand_otho_mat.npy``), to the
j-th orthonormal DCT-II basis vector, or to λ itself ("none"); a value between two of the
set's values gets the linear interpolation of their codes. The codes are a buffer, so they
travel in the state dict. `from_oat_repo` (models/oat_repo.py) loads the repository's own
checkpoints into these classes.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import add_relu
from ..nn import FiLM, MultiBatchNorm2d, routing

__all__ = ["S1", "LambdaEncoding", "OATResNet", "OATWideResNet", "oat_resnet18",
           "oat_resnet34", "oat_wrn16_8", "oat_wrn28_10", "oat_wrn40_2", "VARIANTS", "oats_resnet18", "oats_resnet34",
           "SlimConv2d", "SlimLinear", "SwitchableBN"]

S1 = (0.0, 0.1, 0.2, 0.3, 0.4, 1.0)  # OAT's default training set of λ values
# "official": the OAT repository's architecture (FiLM γ, β through a leaky ReLU, nn.Linear's
# initialisation, a FiLM after the stem BN of the ResNets, OATS's slimmable FiLM MLPs);
# "identity": fastrobust's variant before issue 38 (raw γ, β with an identity initialisation,
# no stem FiLM, OATS's γ, β sliced from the full-width MLP)
VARIANTS = ("official", "identity")

# What `conditioned` and `at_width` set, per thread: {(model, "state" | "width"): [[value],
# ...]}, one entry (a list: its identity) per open context, innermost last. The value is the
# innermost open context's; an exit removes its own entry wherever it is, so contexts exited
# out of order (enter a, enter b, exit a, exit b) leave b's value, then none.
_THREAD = threading.local()


def _thread_value(model, name: str):
    values = getattr(_THREAD, "values", None)
    stack = values.get((model, name)) if values else None
    return stack[-1][0] if stack else None


@contextlib.contextmanager
def _set_thread_value(model, name: str, value):
    values = getattr(_THREAD, "values", None)
    if values is None:
        values = _THREAD.values = {}
    key = (model, name)
    entry = [value]
    values.setdefault(key, []).append(entry)
    try:
        yield
    finally:
        stack = values[key]
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is entry:
                del stack[i]
                break
        if not stack:
            del values[key]


class LambdaEncoding(nn.Module):
    """λ → code: ``kind`` "ro" (random orthogonal, seeded), "dct" (orthonormal DCT-II) or
    "none" (the scalar itself, dim 1). ``forward(lam [N]) -> [N, dim]``.

    "ro" is the OAT repository's encoding: ``lambdas[j]`` is coded by row j of an orthogonal
    ``dim × dim`` matrix (the Q of a QR of a seeded Gaussian matrix; the repository saves it as
    ``rand_otho_mat.npy``, and ``matrix`` holds it here). ``matrix``: that matrix given (an
    ``[R, dim]`` array with R ≥ len(lambdas), e.g. a checkpoint's own), used instead of the
    seeded one. ``strict``: a λ outside the set is an error instead of the interpolation of
    its neighbours' codes (the repository's models know the set only)."""

    def __init__(self, lambdas=S1, kind: str = "ro", dim: int = 128, seed: int = 0,
                 matrix=None, strict: bool = False):
        super().__init__()
        if kind not in ("ro", "dct", "none"):
            raise ValueError(f"encoding must be 'ro', 'dct' or 'none', got {kind!r}")
        given = [float(v) for v in lambdas]
        if len(given) == 0:
            raise ValueError("the set of λ values is empty")
        if len(set(given)) != len(given):
            raise ValueError(f"the λ values must be distinct, got {given}")
        mat = None
        if matrix is not None:
            mat = torch.as_tensor(matrix).detach().to("cpu", torch.float64)
            if kind != "ro" or mat.dim() != 2 or mat.shape[0] < len(given):
                raise ValueError(f"matrix must be a 2-d array with a row for each of the "
                                 f"{len(given)} λ values (kind 'ro'), got shape "
                                 f"{tuple(mat.shape)}")
            dim = mat.shape[1]
        elif kind == "none":
            dim = 1
        else:
            if len(given) > dim:
                raise ValueError(f"{len(given)} λ values need an encoding of at least that "
                                 f"dimension, got dim={dim}")
            if kind == "ro":
                g = torch.Generator().manual_seed(seed)
                mat, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
            else:
                n = torch.arange(dim, dtype=torch.float64)
                dct = torch.cos(math.pi / dim * (n[None, :] + 0.5) * n[:, None])  # [k, n]
                dct[0] *= math.sqrt(1 / dim)
                dct[1:] *= math.sqrt(2 / dim)
                mat = dct.T  # row n: the n-th basis vector's samples (column n of DCT-II)
        if kind == "none":
            codes = torch.tensor(given)[:, None]
        else:
            codes = mat[:len(given)].float()  # row j → code of lambdas[j]
        order = sorted(range(len(given)), key=given.__getitem__)
        self.kind, self.dim, self.strict = kind, dim, strict
        self.rows = order  # the matrix row of each sorted value
        self.register_buffer("values", torch.tensor([given[i] for i in order]))
        self.register_buffer("codes", codes[order].contiguous())
        # the full matrix, for saving as rand_otho_mat.npy; codes already travel in the
        # state dict, so it is not persistent there
        self.register_buffer("matrix", None if mat is None else mat.float(), persistent=False)

    def matrix_codes_match(self) -> bool:
        """Whether ``codes`` (loaded from a state dict) are still rows of ``matrix``."""
        return self.matrix is not None and torch.equal(
            self.codes, self.matrix[self.rows].to(self.codes.device, self.codes.dtype))

    def forward(self, lam: Tensor) -> Tensor:
        lam = lam.to(self.values.device, torch.float32)
        v = self.values
        if self.strict:
            known = (lam[:, None] - v[None, :]).abs().min(1).values <= 1e-6
            if not bool(known.all()):
                bad = sorted(set(lam[~known].tolist()))
                raise ValueError(f"λ {', '.join(f'{b:g}' for b in bad)} is not in this "
                                 f"model's set {[round(x, 6) for x in v.tolist()]}: it "
                                 "encodes those values only")
        if len(v) == 1:
            return self.codes.expand(lam.shape[0], -1)
        hi = torch.searchsorted(v, lam.clamp(v[0], v[-1])).clamp(1, len(v) - 1)
        lo = hi - 1
        w = ((lam - v[lo]) / (v[hi] - v[lo])).clamp(0, 1)[:, None].to(self.codes.dtype)
        return torch.lerp(self.codes[lo], self.codes[hi], w)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, dim={self.dim}, lambdas={self.values.tolist()}"


def slim(channels: int, width: float) -> int:
    """Channels of a layer of ``channels`` at width multiplier ``width``."""
    return max(1, int(round(channels * width)))


class SlimConv2d(nn.Conv2d):
    """A conv whose output channels follow the owner's current width (its first
    ``slim(C_out, w)`` filters) and whose input channels follow its input."""

    def __init__(self, owner, *args, **kw):
        super().__init__(*args, **kw)
        self._owner = [owner]

    def forward(self, x: Tensor) -> Tensor:
        cout = slim(self.out_channels, self._owner[0].width_mult)
        w = self.weight[:cout, :x.shape[1]]
        b = None if self.bias is None else self.bias[:cout]
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class SlimLinear(nn.Linear):
    """A linear layer reading the first ``x.shape[1]`` input features."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight[:, :x.shape[1]], self.bias)


class SwitchableBN(nn.Module):
    """One multi-branch BN per width (slimmable networks' switchable BN), picked by the owner's
    current width."""

    def __init__(self, owner, channels: int, widths, num_branches: int):
        super().__init__()
        self.bns = nn.ModuleList(MultiBatchNorm2d(slim(channels, w), num_branches)
                                 for w in widths)
        self._owner = [owner]

    def forward(self, x: Tensor, **kw) -> Tensor:
        return self.bns[self._owner[0].width_index](x, **kw)


class _Conditioned(nn.Module):
    """Base of the OAT models: owns the encoding and the FiLM layers, and sets their γ, β and
    the dual-BN routing for the calls inside `conditioned`."""

    def _setup(self, lambdas, encoding: str, dim: int, dual_bn: bool, seed: int,
               width_mults=None, variant: str = "official"):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.encoding = LambdaEncoding(lambdas, encoding, dim, seed)
        self.dual_bn, self.variant = dual_bn, variant
        self.width_mults = tuple(sorted(width_mults)) if width_mults else None
        if self.width_mults and not all(0 < w <= 1 for w in self.width_mults):
            raise ValueError(f"width multipliers must lie in (0, 1], got {width_mults}")
        self._widest = self.width_mults[-1] if self.width_mults else 1.0
        self._films: list[FiLM] = []

    @property
    def width_mult(self) -> float:
        """The width multiplier of this thread's calls: `at_width`'s, else the widest."""
        width = _thread_value(self, "width")
        return self._widest if width is None else width

    @property
    def _state(self) -> dict | None:
        """This thread's `conditioned` state, or None: ``{"films": {FiLM: (γ, β)} at the
        width it was entered at, "cond": (codes, index, grad)}`` (the codes serve a FiLM
        used at another width)."""
        return _thread_value(self, "state")

    @property
    def width_index(self) -> int:
        return self.width_mults.index(self.width_mult)

    @contextlib.contextmanager
    def at_width(self, width: float):
        """Runs the calls in the body with the sub-network of width multiplier ``width``."""
        if not self.width_mults or width not in self.width_mults:
            raise ValueError(f"width {width} is not one of this model's widths "
                             f"{self.width_mults}")
        with _set_thread_value(self, "width", width):
            yield self

    def _bn(self, c: int) -> nn.Module:
        k = 2 if self.dual_bn else 1
        return SwitchableBN(self, c, self.width_mults, k) if self.width_mults \
            else MultiBatchNorm2d(c, k)

    def _conv(self, *args, **kw) -> nn.Conv2d:
        return SlimConv2d(self, *args, **kw) if self.width_mults else nn.Conv2d(*args, **kw)

    def _film(self, c: int) -> FiLM:
        identity = self.variant == "identity"
        film = FiLM(c, self.encoding.dim, identity_init=identity,
                    activation=None if identity else "leaky_relu")
        self._films.append(film)
        return film

    def film_args(self, film: FiLM, channels: int) -> dict:
        """The fused BN's FiLM arguments for a layer that has ``channels`` channels now (fewer
        than the FiLM's at a smaller width: the official variant runs that width's slimmable
        sub-MLP, the identity variant takes the first γ, β of the full one)."""
        state = self._state
        if state is None:
            raise RuntimeError(f"{type(self).__name__} needs λ: call model(x, lam) or run it "
                               "inside `with model.conditioned(lam):`")
        gamma, beta = state["films"][film]
        if channels != gamma.shape[-1]:
            if self.variant == "official":  # conditioned at another width than this call's
                codes, inv, grad = state["cond"]
                with torch.set_grad_enabled(grad):
                    gamma, beta = film.gamma_beta(codes, inv, channels)
            else:
                gamma, beta = gamma[..., :channels], beta[..., :channels]
        return {"film_gamma": gamma, "film_beta": beta}

    @contextlib.contextmanager
    def conditioned(self, lam, grad: bool = True):
        """Conditions every call in the body on ``lam`` (a float, or a per-sample ``[N]``
        tensor; a CPU tensor's distinct values are encoded once and gathered per sample, with
        no device sync). Routes the dual BNs: λ = 0 → branch 0 (clean), else branch 1.
        ``grad=False`` computes γ, β without a graph (for attacks and evaluation)."""
        grad = grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            state, branch = self._condition(lam)
        state["cond"] = state["cond"] + (grad,)
        with _set_thread_value(self, "state", state), routing(self, branch=branch):
            yield self

    def _condition(self, lam):
        device = self.encoding.codes.device
        if isinstance(lam, Tensor) and lam.dim() == 1:
            if lam.device.type == "cpu":
                uniq, inv = torch.unique(lam.float(), return_inverse=True)
                codes, inv = self.encoding(uniq.to(device)), inv.to(device)
            else:
                codes, inv = self.encoding(lam), None
            branch = (lam != 0).long().to(device) if self.dual_bn else 0
        else:
            value = float(lam)
            codes, inv = self.encoding(torch.tensor([value], device=device)), None
            branch = int(value != 0) if self.dual_bn else 0
        films = {}
        if inv is None and codes.shape[0] == 1:
            codes = codes[0]  # one condition for the whole batch: [C] γ, β
        slim_width = self.width_mults is not None and self.variant == "official"
        for film in self._films:
            c = slim(film.num_features, self.width_mult) if slim_width else None
            films[film] = film.gamma_beta(codes, inv, c)
        return {"films": films, "cond": (codes, inv)}, branch

    def forward(self, x: Tensor, lam=None) -> Tensor:
        if lam is None:
            if self._state is None:
                raise RuntimeError(f"{type(self).__name__} needs λ: call model(x, lam) or run "
                                   "it inside `with model.conditioned(lam):`")
            return self._forward(x)
        with self.conditioned(lam):
            return self._forward(x)


class _OATBasicBlock(nn.Module):
    """conv → BN·FiLM·ReLU → conv → BN·FiLM, plus the shortcut (conv → BN, no FiLM), ReLU."""

    def __init__(self, owner: _Conditioned, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = owner._conv(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1, self.film1 = owner._bn(planes), owner._film(planes)
        self.conv2 = owner._conv(planes, planes, 3, 1, 1, bias=False)
        self.bn2, self.film2 = owner._bn(planes), owner._film(planes)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(owner._conv(in_planes, planes, 1, stride, bias=False),
                                          owner._bn(planes))
        self._owner = [owner]  # not a submodule

    def forward(self, x: Tensor) -> Tensor:
        own = self._owner[0]
        h = self.conv1(x)
        out = self.bn1(h, activation="relu", **own.film_args(self.film1, h.shape[1]))
        h = self.conv2(out)
        out = self.bn2(h, **own.film_args(self.film2, h.shape[1]))
        return add_relu(out, x if self.shortcut is None else self.shortcut(x))


class OATResNet(_Conditioned):
    """CIFAR ResNet (3×3 stem, four stages, global pooling) in OAT form: the OAT repository's
    ResNet34OAT for ``blocks=(3, 4, 6, 3)``, its slimmable one with ``width_mults``. ``width``
    scales every stage (64: the standard model); ``dual_bn=False`` gives one shared BN (the
    ablation). ``variant``: "official" (the repository's FiLM, and a FiLM after the stem BN:
    conv → BN → FiLM → ReLU) or "identity" (identity-initialised raw FiLM, none at the stem;
    see `VARIANTS`)."""

    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, width: int = 64,
                 in_channels: int = 3, lambdas=S1, encoding: str = "ro", dim: int = 128,
                 dual_bn: bool = True, seed: int = 0, width_mults=None,
                 variant: str = "official"):
        super().__init__()
        self._setup(lambdas, encoding, dim, dual_bn, seed, width_mults, variant)
        self.conv1 = self._conv(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = self._bn(width)
        self.film1 = self._film(width) if variant == "official" else None
        layers, in_planes = [], width
        for i, n in enumerate(blocks):
            planes = width * 2 ** i
            for j in range(n):
                layers.append(_OATBasicBlock(self, in_planes, planes,
                                             2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = (SlimLinear if width_mults else nn.Linear)(in_planes, num_classes)

    def _forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x)
        film = {} if self.film1 is None else self.film_args(self.film1, h.shape[1])
        out = self.layers(self.bn1(h, activation="relu", **film))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class _OATWideBlock(nn.Module):
    """Pre-activation: BN·FiLM·ReLU → conv → BN·FiLM·ReLU → dropout → conv, plus the
    shortcut (the identity, or a 1×1 conv of the activated input)."""

    def __init__(self, owner: _Conditioned, in_planes: int, planes: int, stride: int,
                 drop: float):
        super().__init__()
        self.bn1, self.film1 = owner._bn(in_planes), owner._film(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2, self.film2 = owner._bn(planes), owner._film(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.drop = drop
        self.shortcut = (None if in_planes == planes and stride == 1
                         else nn.Conv2d(in_planes, planes, 1, stride, bias=False))
        self._owner = [owner]

    def forward(self, x: Tensor) -> Tensor:
        own = self._owner[0]
        act = self.bn1(x, activation="relu", **own.film_args(self.film1, x.shape[1]))
        sc = x if self.shortcut is None else self.shortcut(act)
        h = self.conv1(act)
        out = self.bn2(h, activation="relu", **own.film_args(self.film2, h.shape[1]))
        out = F.dropout(out, self.drop, self.training)
        return self.conv2(out) + sc


class OATWideResNet(_Conditioned):
    """Wide-ResNet-depth-k (depth = 6n + 4) in OAT form (the OAT repository's WRN16_8OAT and
    WRN40_2OAT, with ``drop`` 0.3); the final BN has no FiLM. ``variant`` as `OATResNet`'s
    (this network has no stem BN)."""

    def __init__(self, depth: int = 16, widen: int = 8, num_classes: int = 10,
                 in_channels: int = 3, drop: float = 0.0, base: int = 16, lambdas=S1,
                 encoding: str = "ro", dim: int = 128, dual_bn: bool = True, seed: int = 0,
                 variant: str = "official"):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"Wide-ResNet depth must be 6n + 4 with n >= 1, got {depth}")
        self._setup(lambdas, encoding, dim, dual_bn, seed, variant=variant)
        n = (depth - 4) // 6
        widths = [base, base * widen, 2 * base * widen, 4 * base * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, in_planes = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(_OATWideBlock(self, in_planes, planes,
                                            2 if (i > 0 and j == 0) else 1, drop))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = self._bn(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def _forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.blocks(self.conv1(x)), activation="relu")
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def oat_resnet18(num_classes: int = 10, width: int = 64, **kw) -> OATResNet:
    return OATResNet((2, 2, 2, 2), num_classes, width, **kw)


def oat_resnet34(num_classes: int = 10, width: int = 64, **kw) -> OATResNet:
    return OATResNet((3, 4, 6, 3), num_classes, width, **kw)


def oats_resnet18(num_classes: int = 10, width: int = 64, width_mults=(0.5, 0.75, 1.0),
                  **kw) -> OATResNet:
    return OATResNet((2, 2, 2, 2), num_classes, width, width_mults=width_mults, **kw)


def oats_resnet34(num_classes: int = 10, width: int = 64, width_mults=(0.5, 0.75, 1.0),
                  **kw) -> OATResNet:
    return OATResNet((3, 4, 6, 3), num_classes, width, width_mults=width_mults, **kw)


def oat_wrn16_8(num_classes: int = 10, drop: float = 0.3, **kw) -> OATWideResNet:
    """The OAT repository's WRN16_8OAT (SVHN): dropout 0.3."""
    return OATWideResNet(16, 8, num_classes, drop=drop, **kw)


def oat_wrn40_2(num_classes: int = 10, drop: float = 0.3, **kw) -> OATWideResNet:
    """The OAT repository's WRN40_2OAT (STL-10): dropout 0.3."""
    return OATWideResNet(40, 2, num_classes, drop=drop, **kw)


def oat_wrn28_10(num_classes: int = 10, **kw) -> OATWideResNet:
    return OATWideResNet(28, 10, num_classes, **kw)
