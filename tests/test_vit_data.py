"""Dataset readers: small files written here in the exact distribution formats (IDX, gzipped or
raw; CIFAR-10 python batches) and read back through load_dataset."""

import gzip
import pickle
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nkat_gguf.errors import UserError  # noqa: E402
from nkat_vit.data import available, load_dataset, read_idx, subset  # noqa: E402

rng = np.random.default_rng(0)


def write_idx(path, array: np.ndarray, compress: bool):
    """The IDX format as LeCun's MNIST page describes it: 0, 0, type 0x08, ndim, big-endian dims."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist_like(directory, prefix="", test_split="t10k", n_train=30, n_test=12, classes=10, compress=True):
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if compress else ""
    out = {}
    for split, n in (("train", n_train), (test_split, n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, classes, n, dtype=np.uint8)
        write_idx(directory / f"{prefix}{split}-images-idx3-ubyte{ext}", images, compress)
        write_idx(directory / f"{prefix}{split}-labels-idx1-ubyte{ext}", labels, compress)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    array = rng.integers(0, 256, (4, 5, 6), dtype=np.uint8)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(path, array, compress)
    back = read_idx(path)
    assert back.dtype == np.uint8 and np.array_equal(back, array)


def test_idx_damage_is_a_user_error(tmp_path):
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short-images-idx3-ubyte"
    write_idx(short, rng.integers(0, 256, (3, 4, 4), dtype=np.uint8), False)
    short.write_bytes(short.read_bytes()[:-5])
    with pytest.raises(UserError, match="header says"):
        read_idx(short)


def test_mnist_from_data_dir(tmp_path):
    written = write_mnist_like(tmp_path / "mnist")
    data = load_dataset("mnist", str(tmp_path))
    assert data.x_train.shape == (30, 1, 28, 28) and data.x_test.shape == (12, 1, 28, 28)
    assert np.array_equal(data.x_train[:, 0].numpy(), written["train"][0])
    assert np.array_equal(data.y_test.numpy(), written["t10k"][1])
    assert not data.flip_ok
    # the per-channel normalization is the training split's
    assert data.mean[0] == pytest.approx(written["train"][0].mean() / 255, rel=1e-5)
    with pytest.raises(UserError, match="mnist"):
        load_dataset("mnist", str(tmp_path / "nowhere"))


def test_emnist_is_turned_upright_and_letters_count_from_zero(tmp_path):
    written = write_mnist_like(tmp_path / "emnist" / "gzip", prefix="emnist-letters-", test_split="test",
                               classes=26, compress=True)
    for split in ("train", "test"):  # letters' labels are 1..26 in the distribution
        images, labels = written[split]
        write_idx(tmp_path / "emnist" / "gzip" / f"emnist-letters-{split}-labels-idx1-ubyte.gz", labels + 1, True)
    data = load_dataset("emnist", str(tmp_path), emnist_split="letters")
    assert np.array_equal(data.x_train[:, 0].numpy(), written["train"][0].transpose(0, 2, 1))
    assert np.array_equal(data.y_train.numpy(), written["train"][1])
    assert data.num_classes == int(max(written["train"][1].max(), written["test"][1].max())) + 1


def test_cifar10_python_batches(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    batches = {}
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(directory / name, "wb") as f:  # as the distribution: a dict with bytes keys
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f)
        batches[name] = (data, labels)
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.channels == 3 and ds.flip_ok
    first = batches["data_batch_1"][0][0]
    # row-major 3072 = 1024 red, then green, then blue, each 32x32
    assert np.array_equal(ds.x_train[0, 1].numpy(), first[1024:2048].reshape(32, 32))
    assert ds.y_test.tolist() == batches["test_batch"][1]
    (directory / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="test_batch"):
        load_dataset("cifar10", str(tmp_path))


def test_digits_split_is_fixed_and_subset_is_stable():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert torch.equal(a.x_test, b.x_test) and int(a.x_train.max()) == 255
    s1, s2 = subset(a, 100, 50), subset(b, 100, 50)
    assert torch.equal(s1.x_train, s2.x_train) and len(s1.y_test) == 50
    assert "digits" in available(None)
