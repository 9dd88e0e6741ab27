"""fastrobust.data: the embedded digits set and the CIFAR-10 / SVHN readers on tiny files
written here in the distributed formats."""
import os
import pickle

import numpy as np
import pytest
import torch

from fastrobust import data


def test_digits():
    ds = data.digits()
    assert ds.train.x.shape[1:] == (1, 8, 8) and ds.test.x.shape[1:] == (1, 8, 8)
    assert len(ds.train) + len(ds.test) == 1797
    assert 0.18 < len(ds.test) / 1797 < 0.22
    assert ds.train.x.min() >= 0 and ds.train.x.max() <= 1 and ds.train.x.max() > 0.9
    for c in range(10):  # stratified: every class in both splits
        assert (ds.test.y == c).sum() > 25 and (ds.train.y == c).sum() > 100
    again = data.digits()
    assert torch.equal(again.test.y, ds.test.y)  # a fixed split


def _write_cifar(directory, n=4):
    os.makedirs(directory)
    rng = np.random.default_rng(0)
    batches = {}
    for name in data.CIFAR10_FILES:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = list(rng.integers(0, 10, n))
        with open(os.path.join(directory, name), "wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": name.encode()}, f)
        batches[name] = (x, y)
    return batches


def test_cifar10_reader(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = data.load("cifar10", str(tmp_path))
    assert ds.train.x.shape == (20, 3, 32, 32) and ds.test.x.shape == (4, 3, 32, 32)
    x, y = batches["data_batch_2"]
    # row layout: 1024 red, then green, then blue values, each row-major 32x32
    img = ds.train.x[4 + 1]  # second image of the second batch
    assert img[1, 2, 3] == pytest.approx(x[1, 1024 + 2 * 32 + 3] / 255)
    assert ds.train.y[4 + 1] == y[1]
    assert ds.test.y.tolist() == [int(v) for v in batches["test_batch"][1]]


def test_svhn_reader(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for name, n in (("train_32x32.mat", 5), ("test_32x32.mat", 3)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [3], [9]][:n], dtype=np.uint8)
        savemat(str(tmp_path / name), {"X": X, "y": y})
        if n == 5:
            train_X = X
    ds = data.load("svhn", str(tmp_path))
    assert ds.train.x.shape == (5, 3, 32, 32) and ds.test.x.shape == (3, 3, 32, 32)
    assert ds.train.y.tolist() == [0, 1, 2, 3, 9]  # label 10 is the digit 0
    assert ds.train.x[2, 1, 4, 5] == pytest.approx(train_X[4, 5, 1, 2] / 255)


@pytest.mark.parametrize("name,files", [("cifar10", data.CIFAR10_FILES),
                                        ("svhn", data.SVHN_FILES)])
def test_missing_files_name_what_is_expected(tmp_path, name, files):
    with pytest.raises(data.DataMissing) as e:
        data.load(name, str(tmp_path))
    msg = str(e.value)
    assert all(f in msg for f in files) and "never downloads" in msg
    with pytest.raises(data.DataMissing, match="data-root"):
        data.load(name, None)
    with pytest.raises(ValueError, match="unknown data set"):
        data.load("imagenet")


def test_batches():
    split = data.Split(torch.arange(10.0)[:, None], torch.arange(10))
    assert [len(y) for _, y in data.Batches(split, 4)] == [4, 4, 2]
    assert len(data.Batches(split, 4, drop_last=True)) == 2
    a = [y.tolist() for _, y in data.Batches(split, 4, True, torch.Generator().manual_seed(1))]
    b = [y.tolist() for _, y in data.Batches(split, 4, True, torch.Generator().manual_seed(1))]
    assert a == b and sorted(sum(a, [])) == list(range(10)) and sum(a, []) != list(range(10))


@pytest.mark.parametrize("damage", ["garbage", "wrong_size", "no_labels"])
def test_damaged_cifar_file_is_named(tmp_path, damage):
    d = tmp_path / "cifar-10-batches-py"
    _write_cifar(d)
    bad = d / "data_batch_3"
    if damage == "garbage":
        bad.write_bytes(os.urandom(512))
    elif damage == "wrong_size":
        with open(bad, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 1000), np.uint8), b"labels": [0] * 4}, f)
    else:
        with open(bad, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 3072), np.uint8)}, f)
    with pytest.raises(data.DataCorrupt) as e:
        data.load("cifar10", str(tmp_path))
    msg = str(e.value)
    assert str(bad) in msg and "not a CIFAR-10 python batch" in msg and "\n" not in msg


def test_damaged_svhn_file_is_named(tmp_path):
    from scipy.io import savemat

    savemat(str(tmp_path / "train_32x32.mat"),
            {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1), np.uint8)})
    (tmp_path / "test_32x32.mat").write_bytes(b"\x00garbage" * 40)
    with pytest.raises(data.DataCorrupt) as e:
        data.load("svhn", str(tmp_path))
    assert str(tmp_path / "test_32x32.mat") in str(e.value) and "not an SVHN .mat file" in \
        str(e.value)


def test_damaged_data_file_is_one_cli_line(tmp_path, capsys):
    from fastrobust.cli import main

    d = tmp_path / "cifar-10-batches-py"
    _write_cifar(d)
    (d / "test_batch").write_bytes(b"")
    code = main(["train", "oat", "--dataset", "cifar10", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "test_batch" in err[0] and "Traceback" not in err[0]
