"""Data sets for the trainers, read from what is on disk; nothing is ever downloaded.

- ``digits`` (the default): scikit-learn's handwritten digits (1,797 images of 8×8, 10 classes),
  shipped inside scikit-learn; a fixed, stratified 80/20 split.
- ``cifar10``: the "CIFAR-10 python version" as distributed (``cifar-10-batches-py/`` with
  ``data_batch_1`` … ``data_batch_5`` and ``test_batch``), under ``root``.
- ``svhn``: the cropped-digits format as distributed (``train_32x32.mat``, ``test_32x32.mat``),
  under ``root``.

Images come back as float32 ``[N, C, H, W]`` in [0, 1] and labels as int64 ``[N]``.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DATASETS = ("digits", "cifar10", "svhn")
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
SVHN_FILES = ["train_32x32.mat", "test_32x32.mat"]


@dataclass
class Split:
    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.x.shape[-1]


class DataMissing(FileNotFoundError):
    """A data set's files are not where they were looked for."""


class DataCorrupt(ValueError):
    """A data set's file is there but is not what its reader expects (one line naming it)."""


def _corrupt(path: str, expected: str, err: BaseException) -> DataCorrupt:
    why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataCorrupt(f"{path}: not {expected} ({type(err).__name__}: {why[:160]})")


def load(name: str = "digits", root: str | None = None) -> Dataset:
    """Loads a data set by name (see the module docstring)."""
    if name == "digits":
        return digits()
    if name in ("cifar10", "svhn"):
        if root is None:
            raise DataMissing(f"{name}: pass the directory that holds its files "
                              f"(--data-root); fastrobust never downloads data")
        return cifar10(root) if name == "cifar10" else svhn(root)
    raise ValueError(f"unknown data set {name!r}; choose from {DATASETS}")


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's digits: 8×8 grayscale images (values 0..16, scaled to [0, 1])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    test = []
    for c in range(10):  # stratified: the same fraction of every class in the test split
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test.append(idx[:round(len(idx) * test_fraction)])
    test_idx = torch.cat(test).sort().values
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test_idx] = False
    return Dataset("digits", Split(x[mask], y[mask]), Split(x[test_idx], y[test_idx]), 10)


def _missing(name: str, directory: str, files: list[str]) -> DataMissing:
    absent = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    return DataMissing(
        f"{name}: missing {', '.join(absent)} in {os.path.abspath(directory)}. Expected the "
        f"files as distributed: {', '.join(files)}. fastrobust never downloads data.")


def cifar10(root: str) -> Dataset:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (or ``root`` itself holding the batches)."""
    directory = os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(directory):
        directory = root
    if not all(os.path.isfile(os.path.join(directory, f)) for f in CIFAR10_FILES):
        raise _missing("cifar10", directory, CIFAR10_FILES)

    def read(files):
        xs, ys = [], []
        for f in files:
            path = os.path.join(directory, f)
            expected = ("a CIFAR-10 python batch (a pickled dict with b'data' [n, 3072] uint8 "
                        "and b'labels' [n])")
            try:
                with open(path, "rb") as fh:
                    batch = pickle.load(fh, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                labels = np.asarray(batch[b"labels"], dtype=np.int64)
                if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
                    raise ValueError(f"data has shape {list(data.shape)} and {len(labels)} "
                                     "labels")
            except Exception as e:  # noqa: BLE001 - any reader failure names the file
                raise _corrupt(path, expected, e) from None
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(labels)
        x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
        return Split(x, torch.from_numpy(np.concatenate(ys)))

    return Dataset("cifar10", read(CIFAR10_FILES[:5]), read(CIFAR10_FILES[5:]), 10)


def svhn(root: str) -> Dataset:
    """SVHN cropped digits from ``root/train_32x32.mat`` and ``root/test_32x32.mat`` (label 10
    is the digit 0, as distributed)."""
    if not all(os.path.isfile(os.path.join(root, f)) for f in SVHN_FILES):
        raise _missing("svhn", root, SVHN_FILES)
    from scipy.io import loadmat

    def read(f):
        path = os.path.join(root, f)
        try:
            m = loadmat(path)
            X, y = m["X"], m["y"]
            if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or y.size != X.shape[3]:
                raise ValueError(f"X has shape {list(X.shape)} and y {y.size} labels")
        except Exception as e:  # noqa: BLE001 - any reader failure names the file
            raise _corrupt(path, "an SVHN .mat file (X [32, 32, 3, n] uint8, y [n, 1])",
                           e) from None
        x = torch.from_numpy(np.ascontiguousarray(X.transpose(3, 2, 0, 1))).float() / 255
        return Split(x, torch.from_numpy(y.astype(np.int64).reshape(-1)) % 10)

    return Dataset("svhn", read(SVHN_FILES[0]), read(SVHN_FILES[1]), 10)


class Batches:
    """Mini-batches of a split: shuffled with a torch.Generator (so a run and its resumption
    see the same order) or in order; the last partial batch is kept unless ``drop_last``."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        self.generator, self.drop_last = generator, drop_last

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.split)
        order = (torch.randperm(n, generator=self.generator) if self.shuffle
                 else torch.arange(n))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.split.x[idx], self.split.y[idx]
