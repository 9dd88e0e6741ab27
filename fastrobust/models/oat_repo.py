"""Checkpoints of the OAT repository (VITA-Group/Once-for-All-Adversarial-Training) as
fastrobust OAT models.

    model = from_oat_repo("latest.pth", "rand_otho_mat.npy")     # ResNet34OAT, eval mode
    logits = model(x, 0.2)                                        # or a per-sample [N] λ

The repository's models and their state-dict names: ``ResNet34OAT`` (CIFAR-10: ``conv1``,
``bn1``, ``film1``, ``bundle1..4.<i>.{conv1, bn1, film1, conv2, bn2, film2, conv_sc, bn_sc}``,
``linear``), ``WRN16_8OAT`` (SVHN) and ``WRN40_2OAT`` (STL-10) (``conv1``,
``bundle1..3.<i>.{bn1, film1, conv1, bn2, film2, conv2, convShortcut}``, ``bn1``, ``fc``;
dropout 0.3), and ``SlimmableResNet34OAT`` (OATS: the ResNet's names, every BN a list per
width). A dual BN is ``BN_c`` (λ = 0) and ``BN_a``; a FiLM is ``MLP.0`` and ``MLP.2``. Its
checkpoints are ``{'model': state_dict, 'optimizer': ..., 'epoch': ...}`` saved from a
``DataParallel`` model (keys start with ``module.``), or bare state dicts (``best_TA*.pth``).
The λ code of ``lambdas[j]`` is row j of ``rand_otho_mat.npy``. The model's forward with
per-sample λ equals the repository's with ``idx2BN`` = the number of λ = 0 samples, placed
first (tests/test_oat_repo.py checks logits, input gradients and running statistics).
"""
from __future__ import annotations

import os
import pickle
import re

import numpy as np
import torch
from torch import Tensor

from .oat import S1, LambdaEncoding, OATResNet, OATWideResNet

__all__ = ["from_oat_repo", "OAT_REPO_ARCHS"]

OAT_REPO_ARCHS = ("ResNet34OAT", "WRN16_8OAT", "WRN40_2OAT", "SlimmableResNet34OAT")
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class _Misfit(ValueError):
    pass


def _load(checkpoint) -> dict[str, Tensor]:
    """The model's state dict from a path, OAT.py's checkpoint dict or a bare state dict,
    without ``module.`` prefixes."""
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise _Misfit(f"checkpoint: {os.fspath(checkpoint)} cannot be read "
                          f"({str(e).splitlines()[0][:120]})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not checkpoint or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in checkpoint.items()):
        raise _Misfit("checkpoint: neither a state dict nor OAT.py's {'model': state_dict, "
                      "...}")
    return {k[len("module."):] if k.startswith("module.") else k: v
            for k, v in checkpoint.items()}


def _count(sd, pattern: str) -> int:
    found = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def _structure(sd: dict) -> dict:
    """What the keys say: the family, its sizes and its BN form."""
    if "conv1.weight" not in sd or "bundle1.0.conv1.weight" not in sd:
        raise _Misfit(f"checkpoint: not a state dict of an OAT repository model "
                      f"({', '.join(OAT_REPO_ARCHS)}): no 'bundle1.0.conv1.weight' key "
                      f"(its first keys: {', '.join(list(sd)[:3])})")
    s = {"in_channels": sd["conv1.weight"].shape[1]}
    if "linear.weight" in sd:  # the ResNets
        s["family"] = "resnet"
        s["blocks"] = tuple(_count(sd, rf"bundle{b}\.(\d+)\.") for b in range(1, 5))
        s["num_classes"], s["width"] = sd["linear.weight"].shape[0], sd["conv1.weight"].shape[0]
        film = "film1.MLP.0.weight"
        if "bn1.BN_c.0.weight" in sd or "bn1.bn.0.weight" in sd:  # switchable BNs
            group = "BN_c" if "bn1.BN_c.0.weight" in sd else "bn"
            sizes = [sd[f"bn1.{group}.{i}.weight"].shape[0]
                     for i in range(_count(sd, rf"bn1\.{group}\.(\d+)\."))]
            s["width_mults"] = tuple(c / s["width"] for c in sizes)
            s["dual_bn"] = group == "BN_c"
        else:
            s["dual_bn"] = "bn1.BN_c.weight" in sd
        name = "SlimmableResNet34OAT" if "width_mults" in s else "ResNet34OAT"
        s["name"] = name if (s["blocks"], s["width"]) == ((3, 4, 6, 3), 64) else \
            f"an OAT-repository ResNet (blocks {s['blocks']}, width {s['width']})"
    elif "fc.weight" in sd:  # the Wide-ResNets
        s["family"] = "wrn"
        n = _count(sd, r"bundle1\.(\d+)\.")
        s["depth"], s["widen"] = 6 * n + 4, sd["bundle1.0.conv1.weight"].shape[0] // 16
        s["num_classes"] = sd["fc.weight"].shape[0]
        s["dual_bn"] = "bn1.BN_c.weight" in sd
        film = "bundle1.0.film1.MLP.0.weight"
        named = {(16, 8): "WRN16_8OAT", (40, 2): "WRN40_2OAT"}
        s["name"] = named.get((s["depth"], s["widen"]),
                              f"an OAT-repository Wide-ResNet (depth {s['depth']}, widen "
                              f"{s['widen']})")
    else:
        raise _Misfit("checkpoint: not a state dict of an OAT repository model: it has "
                      "neither 'linear.weight' (ResNet34OAT) nor 'fc.weight' (WRN*OAT)")
    if film not in sd:
        raise _Misfit(f"checkpoint: {s['name']} without FiLM layers (no {film!r})")
    s["film_in"] = sd[film].shape[1]
    return s


def _matrix(encoding_matrix, film_in: int, n: int):
    if encoding_matrix is None:
        if film_in != 1:
            raise _Misfit(f"encoding_matrix: needed: the checkpoint's FiLM layers take "
                          f"{film_in}-d codes (rand_otho_mat.npy beside it)")
        return None
    if isinstance(encoding_matrix, (str, os.PathLike)):
        try:
            encoding_matrix = np.load(encoding_matrix, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise _Misfit(f"encoding_matrix: {os.fspath(encoding_matrix)} cannot be read "
                          f"({str(e).splitlines()[0][:120]})") from None
    mat = torch.as_tensor(np.asarray(encoding_matrix, dtype=np.float64))
    if mat.dim() != 2 or mat.shape[1] != film_in or mat.shape[0] < n:
        raise _Misfit(f"encoding_matrix: shape {tuple(mat.shape)} does not fit: the "
                      f"checkpoint's FiLM layers take {film_in}-d codes and {n} λ values need "
                      f"{n} rows (row j codes lambdas[j])")
    return mat


def _official_names(key: str, s: dict) -> tuple[list[str], bool]:
    """The repository's key(s) of one of our state-dict keys, and whether they are a dual
    BN's pair to stack (BN_c, BN_a) as our [K, C] rows."""
    parts = key.split(".")
    if s["family"] == "resnet":
        if parts[0] == "layers":
            i, rest = int(parts[1]), parts[2:]
            b = 0
            while i >= s["blocks"][b]:
                i, b = i - s["blocks"][b], b + 1
            sub = {"0": "conv_sc", "1": "bn_sc"}
            if rest[0] == "shortcut":
                rest = [sub[rest[1]]] + rest[2:]
            parts = [f"bundle{b + 1}", str(i)] + rest
        elif parts[0] == "fc":
            parts = ["linear"] + parts[1:]
    else:
        if parts[0] == "blocks":
            i, rest = int(parts[1]), parts[2:]
            n = (s["depth"] - 4) // 6
            if rest[0] == "shortcut":
                rest = ["convShortcut"] + rest[1:]
            parts = [f"bundle{i // n + 1}", str(i % n)] + rest
        elif parts[0] == "bn":
            parts = ["bn1"] + parts[1:]
    if "mlp" in parts:  # a FiLM
        parts[parts.index("mlp")] = "MLP"
        return [".".join(parts)], False
    field = parts[-1]
    if field in _BN_FIELDS and (parts[-2].startswith("bn") or "bns" in parts):
        if "bns" in parts:  # switchable: <bn>.bns.<i>.<field> → <bn>.{BN_c,BN_a,bn}.<i>
            at = parts.index("bns")
            head, idx = ".".join(parts[:at]), parts[at + 1]
            groups = ("BN_c", "BN_a") if s["dual_bn"] else ("bn",)
            return [f"{head}.{g}.{idx}.{field}" for g in groups], True
        head = ".".join(parts[:-1])
        if s["dual_bn"]:
            return [f"{head}.BN_c.{field}", f"{head}.BN_a.{field}"], True
        return [f"{head}.{field}"], True
    return [".".join(parts)], False


def _convert(sd: dict, model, s: dict) -> dict:
    """The repository's state dict in our model's names and shapes, or a _Misfit naming the
    first key that does not fit."""
    out, used = {}, set()
    for key, ours in model.state_dict().items():
        if key.startswith("encoding."):
            out[key] = ours
            continue
        names, stack = _official_names(key, s)
        missing = [n for n in names if n not in sd]
        if missing:
            raise _Misfit(f"checkpoint: no {missing[0]!r}, which {s['name']} has (for "
                          f"fastrobust's {key!r})")
        used.update(names)
        value = torch.stack([sd[n] for n in names]) if stack else sd[names[0]]
        if tuple(value.shape) != tuple(ours.shape):
            shapes = [tuple(sd[n].shape) for n in names]
            raise _Misfit(f"checkpoint: {names[0]!r} has shape {shapes[0]}, but {s['name']} "
                          f"as the other keys describe it needs "
                          f"{tuple(ours.shape[1:]) if stack else tuple(ours.shape)}")
        out[key] = value.to(ours.dtype)
    extra = [k for k in sd if k not in used]
    if extra:
        raise _Misfit(f"checkpoint: {extra[0]!r} has no place in {s['name']} "
                      f"({len(extra)} such keys)")
    return out


def from_oat_repo(checkpoint, encoding_matrix, arch: str | None = None, lambdas=S1):
    """A fastrobust OAT model (`OATResNet` / `OATWideResNet`, the official variant, in eval
    mode; ``.train()`` to fine-tune) holding an OAT-repository checkpoint.

    ``checkpoint``: a path, the dict OAT.py saves (``{'model': state_dict, ...}``, keys with
    or without ``module.``) or a bare state dict. ``encoding_matrix``: a path to the run's
    ``rand_otho_mat.npy`` or an array; row j codes ``lambdas[j]`` (None for a run with
    ``--encoding none``). ``arch``: one of `OAT_REPO_ARCHS`, checked against the keys;
    inferred from them when None. ``lambdas``: the run's ``--lambda_choices``, in its order.
    ``model(x, lam)`` with a λ outside ``lambdas`` is an error. Anything that does not fit is
    a ValueError of one line naming the argument."""
    if arch is not None and arch not in OAT_REPO_ARCHS:
        raise ValueError(f"arch: must be one of {OAT_REPO_ARCHS} or None, got {arch!r}")
    lams = [float(v) for v in lambdas]
    if not lams or len(set(lams)) != len(lams) or not all(0 <= v <= 1 for v in lams):
        raise ValueError(f"lambdas: must be distinct values in [0, 1], got {list(lambdas)}")
    try:
        sd = _load(checkpoint)
        s = _structure(sd)
        if arch is not None and arch != s["name"]:
            raise _Misfit(f"arch: {arch!r} given, but the checkpoint holds {s['name']}")
        mat = _matrix(encoding_matrix, s["film_in"], len(lams))
        common = dict(num_classes=s["num_classes"], in_channels=s["in_channels"],
                      lambdas=lams, encoding="ro" if mat is not None else "none",
                      dim=s["film_in"], dual_bn=s["dual_bn"], variant="official")
        if s["family"] == "resnet":
            model = OATResNet(s["blocks"], width=s["width"],
                              width_mults=s.get("width_mults"), **common)
        else:
            model = OATWideResNet(s["depth"], s["widen"], drop=0.3, **common)
        model.encoding = LambdaEncoding(lams, common["encoding"], s["film_in"], matrix=mat,
                                        strict=True)
        model.load_state_dict(_convert(sd, model, s))
    except _Misfit as e:
        raise ValueError(str(e)) from None
    model.oat_repo_arch = s["name"]
    return model.eval()
