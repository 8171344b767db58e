"""pyvarinf2.data: UCI splits, the shipped yacht copy, the idx reader, clear errors."""
import gzip
import hashlib
import shutil
import struct

import numpy as np
import pytest
import torch

from pyvarinf2 import data


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_uci_split_matches_the_files_and_is_normalised_with_training_statistics(data_dir):
    folder = data_dir / "uci" / "concrete" / "data"
    raw = np.loadtxt(folder / "data.txt")
    train = np.loadtxt(folder / "index_train_3.txt", dtype=int)
    test = np.loadtxt(folder / "index_test_3.txt", dtype=int)
    d = data.load_uci("concrete", split=3, data_dir=data_dir)
    assert d.x_train.shape == (len(train), 8) and d.x_test.shape == (len(test), 8)
    assert d.x_train.dtype == torch.float32 and d.n_train == len(train) == 927
    # training part standardised exactly, test part with the *training* statistics
    np.testing.assert_allclose(d.x_train.double().mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(d.x_train.double().std(0, unbiased=False).numpy(), 1.0, atol=1e-5)
    assert d.y_mean == pytest.approx(raw[train, 8].mean(), rel=1e-12)
    assert d.y_std == pytest.approx(raw[train, 8].std(), rel=1e-12)
    np.testing.assert_allclose(d.y_test_original.numpy(), raw[test, 8], rtol=1e-5)
    np.testing.assert_allclose(d.x_test.numpy(),
                               (raw[test, :8] - raw[train, :8].mean(0)) / raw[train, :8].std(0),
                               rtol=1e-4, atol=1e-5)
    # the test statistics are not those of the training part
    assert abs(float(d.y_test.mean())) > 1e-3


def test_uci_feature_and_target_indices_are_honoured(data_dir):
    # naval: 18 columns, features 0-15, target 16 (column 17 unused)
    d = data.load_uci("naval-propulsion-plant", split=0, data_dir=data_dir)
    raw = np.loadtxt(data_dir / "uci" / "naval-propulsion-plant" / "data" / "data.txt")
    test = np.loadtxt(data_dir / "uci" / "naval-propulsion-plant" / "data" / "index_test_0.txt",
                      dtype=int)
    assert d.in_features == 16
    np.testing.assert_allclose(d.y_test_original.numpy(), raw[test, 16], rtol=1e-5)


def test_n_splits(data_dir):
    assert data.uci_n_splits("protein-tertiary-structure", data_dir) == 5
    assert data.uci_n_splits("yacht", data_dir) == 20
    assert data.uci_n_splits("embedded") == 20


def test_embedded_yacht_is_a_byte_copy_and_loads_like_the_shared_one(data_dir):
    shared = data_dir / "uci" / "yacht" / "data"
    for name in ["data.txt", "index_features.txt", "index_target.txt", "n_splits.txt"] + \
            [f"index_{p}_{i}.txt" for p in ("train", "test") for i in range(20)]:
        assert _sha(data.EMBEDDED_DIR / f"yacht_{name}") == _sha(shared / name), name
    assert (data.EMBEDDED_DIR / "yacht_PROVENANCE.txt").is_file()
    a = data.load_uci("embedded", split=7)
    b = data.load_uci("yacht", split=7, data_dir=data_dir)
    assert a.name == "yacht" and a.n_train == 277
    for f in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, f), getattr(b, f))


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("PYVARINF2_DATA", raising=False)
    assert data.resolve_data_dir() == data.EMBEDDED_DIR
    monkeypatch.setenv("PYVARINF2_DATA", str(tmp_path))
    assert data.resolve_data_dir() == tmp_path
    assert data.resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    # without a data directory, "yacht" is the shipped copy
    monkeypatch.delenv("PYVARINF2_DATA")
    assert data.load_uci("yacht", split=0).n_train == 277


def test_uci_errors_name_the_dataset_and_the_place(tmp_path, data_dir):
    with pytest.raises(data.DataError, match="unknown dataset 'cifar10'"):
        data.check_dataset("cifar10", tmp_path)
    with pytest.raises(data.DataError) as err:
        data.load_uci("concrete", data_dir=tmp_path)
    assert "'concrete'" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(data.DataError, match="split 20 does not exist"):
        data.load_uci("concrete", split=20, data_dir=data_dir)
    # a copy whose split file is missing, and one whose indices are out of range
    bad = tmp_path / "uci" / "yacht" / "data"
    shutil.copytree(data_dir / "uci" / "yacht" / "data", bad)
    (bad / "index_test_2.txt").unlink()
    with pytest.raises(data.DataError, match="index_test_2.txt"):
        data.check_dataset("yacht", tmp_path)
    data.check_dataset("yacht", tmp_path, splits=[0, 1])  # the others are fine
    (bad / "index_train_0.txt").write_text("0\n1\n5000\n")
    with pytest.raises(data.DataError, match="out of range"):
        data.load_uci("yacht", split=0, data_dir=tmp_path)


def test_mnist_idx_reader(data_dir):
    d = data.load_image_dataset("mnist", data_dir)
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    assert d.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(d.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                 974, 1009]
    assert torch.bincount(d.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                  6265, 5851, 5949]
    # the mean pixel of the MNIST training set is the well-known 0.1307
    assert float(d.x_train.mean()) == pytest.approx(0.1307, abs=1e-4)
    f = data.load_image_dataset("fashion_mnist", data_dir, parts=("test",))
    assert torch.bincount(f.y_test).tolist() == [1000] * 10 and f.x_train.shape[0] == 0


def test_idx_reader_rejects_malformed_files(tmp_path):
    good = struct.pack(">HBBII", 0, 8, 2, 2, 3) + bytes(range(6))
    p = tmp_path / "ok.gz"
    with gzip.open(p, "wb") as fh:
        fh.write(good)
    np.testing.assert_array_equal(data.read_idx(p), np.arange(6, dtype=np.uint8).reshape(2, 3))
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(data.DataError, match="announces"):
        data.read_idx(tmp_path / "short")
    (tmp_path / "float").write_bytes(struct.pack(">HBBI", 0, 0x0D, 1, 1) + b"\0\0\0\0")
    with pytest.raises(data.DataError, match="unsigned-byte"):
        data.read_idx(tmp_path / "float")
    (tmp_path / "notgz.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="cannot read"):
        data.read_idx(tmp_path / "notgz.gz")
    # bytes flipped inside the compressed stream: zlib's own error, reported the same way
    big = struct.pack(">HBBII", 0, 8, 2, 200, 300) + np.random.default_rng(0).integers(
        0, 256, 60000, dtype=np.uint8).tobytes()
    packed = bytearray(gzip.compress(big))
    for i in range(100, len(packed) - 100, 97):
        packed[i] ^= 0xFF
    (tmp_path / "corrupt.gz").write_bytes(bytes(packed))
    with pytest.raises(data.DataError, match="cannot read idx file .*corrupt.gz"):
        data.read_idx(tmp_path / "corrupt.gz")


def test_missing_mnist_files_are_listed(tmp_path, data_dir):
    (tmp_path / "mnist").mkdir()
    shutil.copy(data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz", tmp_path / "mnist")
    with pytest.raises(data.DataError) as err:
        data.load_image_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "t10k-images-idx3-ubyte.gz" in msg
    assert "t10k-labels" not in msg


def test_load_dataset_subsets(data_dir):
    d = data.load_dataset("energy", data_dir, split=1, train_subset=50, test_subset=20)
    assert d.x_train.shape == (50, 8) and d.y_test.shape == (20,)
    assert data.dataset_kind("mnist") == "classification"
    assert data.dataset_kind("default") == "regression"
