"""Image classification sets read from their standard distribution formats; no downloads.

  digits         scikit-learn's bundled 8x8 digits (1,797 images; a fixed stratified 80/20 split)
  fashion-mnist  IDX files (gz or raw); Debian's dataset-fashion-mnist package puts them in
                 /usr/share/datasets/fashion-mnist, used when no --data-dir has them
  mnist          IDX files in <data-dir>/mnist or <data-dir>
  emnist         IDX files emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz] in
                 <data-dir>/emnist[/gzip] or <data-dir>; images are stored transposed, as
                 distributed, and are turned upright here
  cifar10        the python batches (data_batch_1..5, test_batch) in <data-dir>/cifar-10-batches-py
                 or <data-dir>

Everything is held as uint8 tensors (N, C, H, W); models see (x / 255 - mean) / std with the
per-channel mean and std of the training split.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from nkat_gguf.errors import UserError

DATASETS = ("digits", "fashion-mnist", "mnist", "emnist", "cifar10")
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
EMNIST_SPLITS = ("balanced", "byclass", "bymerge", "digits", "letters", "mnist")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_SUBDIRS = {"fashion-mnist": ("fashion-mnist", "fashion_mnist", "fashion"), "mnist": ("mnist", "MNIST"),
            "emnist": ("emnist/gzip", "emnist", "gzip"), "cifar10": ("cifar-10-batches-py", "cifar10", "cifar-10")}
# Horizontal flips change a digit or a letter's meaning; they are fine for clothes and objects.
_FLIP_OK = {"digits": False, "mnist": False, "emnist": False, "fashion-mnist": True, "cifar10": True}


@dataclass
class ImageData:
    name: str
    x_train: torch.Tensor  # uint8 (N, C, H, W)
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: str
    flip_ok: bool = False
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)

    def __post_init__(self):
        if not self.mean:
            x = self.x_train.float() / 255.0
            self.mean = [float(v) for v in x.mean(dim=(0, 2, 3))]
            self.std = [max(float(v), 1e-3) for v in x.std(dim=(0, 2, 3))]

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "train": int(len(self.y_train)),
                "test": int(len(self.y_test)), "classes": self.num_classes,
                "shape": list(self.x_train.shape[1:])}


# -- the formats -------------------------------------------------------------------------------
def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or raw."""
    path = Path(path)
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES or data[3] == 0:
        raise UserError(f"{path}: not an IDX file (bad magic number)")
    ndim, dtype = data[3], np.dtype(_IDX_TYPES[data[2]])
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: IDX header is truncated")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise UserError(f"{path}: IDX payload is {len(data) - header} bytes, its header says {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise UserError(f"{path}: CIFAR-10 batch has data {data.shape} and {len(labels)} labels, "
                        "expected (N, 3072) and N")
    return data.reshape(-1, 3, 32, 32), labels


# -- finding the files -------------------------------------------------------------------------
def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    # the original MNIST site's names use "-idx3-ubyte", some mirrors "-idx3-ubyte" with a dot
    alt = stem.replace("-idx", ".idx")
    for name in (alt + ".gz", alt):
        if (directory / name).is_file():
            return directory / name
    return None


def _candidate_dirs(name: str, data_dir: str | None) -> list[Path]:
    dirs = []
    if data_dir:
        root = Path(data_dir)
        dirs += [root / sub for sub in _SUBDIRS.get(name, ())] + [root]
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_DIR)
    return dirs


def _idx_pair(directory: Path, prefix: str, split: str) -> tuple[Path, Path] | None:
    images = _find(directory, f"{prefix}{split}-images-idx3-ubyte")
    labels = _find(directory, f"{prefix}{split}-labels-idx1-ubyte")
    return (images, labels) if images and labels else None


def _load_idx_set(name: str, data_dir: str | None, prefix: str = "", transpose: bool = False):
    for directory in _candidate_dirs(name, data_dir):
        train, test = _idx_pair(directory, prefix, "train"), _idx_pair(directory, prefix, "t10k" if not prefix else "test")
        if train and test:
            arrays = []
            for images, labels in (train, test):
                x, y = read_idx(images), read_idx(labels).astype(np.int64)
                if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                    raise UserError(f"{images}: {x.shape} images do not match {labels}: {y.shape} labels")
                if transpose:
                    x = x.transpose(0, 2, 1)
                arrays.append((np.ascontiguousarray(x[:, None]), y))
            return arrays, str(directory)
    where = ", ".join(str(d) for d in _candidate_dirs(name, data_dir)) or "(no --data-dir given)"
    stem = f"{prefix}train-images-idx3-ubyte[.gz]"
    raise UserError(f"{name}: no {stem} and its label/test files in {where}")


def load_digits_set() -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return ImageData("digits", torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
                     torch.from_numpy(y_te), 10, "scikit-learn load_digits (80/20 split, random_state 0)")


def load_cifar10(data_dir: str | None) -> ImageData:
    for directory in _candidate_dirs("cifar10", data_dir):
        train_files = [directory / f"data_batch_{i}" for i in range(1, 6)]
        if all(p.is_file() for p in train_files) and (directory / "test_batch").is_file():
            parts = [read_cifar_batch(p) for p in train_files]
            x_te, y_te = read_cifar_batch(directory / "test_batch")
            x_tr = np.concatenate([p[0] for p in parts])
            y_tr = np.concatenate([p[1] for p in parts])
            return ImageData("cifar10", torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
                             torch.from_numpy(y_te), 10, str(directory), flip_ok=True)
    where = ", ".join(str(d) for d in _candidate_dirs("cifar10", data_dir)) or "(no --data-dir given)"
    raise UserError(f"cifar10: no data_batch_1..5 and test_batch in {where}")


def check_data_dir(data_dir: str | None, name: str | None = None) -> None:
    """A --data-dir that is not a directory is a mistake, even where another copy would be found
    (Fashion-MNIST's Debian package, the built-in digits)."""
    if data_dir and not Path(data_dir).is_dir():
        wanted = f" (looking for {name})" if name else ""
        raise UserError(f"--data-dir {data_dir}: no such directory{wanted}")


def load_dataset(name: str, data_dir: str | None = None, emnist_split: str = "balanced") -> ImageData:
    check_data_dir(data_dir, name)
    if name == "digits":
        return load_digits_set()
    if name == "cifar10":
        return load_cifar10(data_dir)
    if name in ("fashion-mnist", "mnist"):
        ((x_tr, y_tr), (x_te, y_te)), source = _load_idx_set(name, data_dir)
    elif name == "emnist":
        if emnist_split not in EMNIST_SPLITS:
            raise UserError(f"--emnist-split must be one of {', '.join(EMNIST_SPLITS)}, not {emnist_split!r}")
        ((x_tr, y_tr), (x_te, y_te)), source = _load_idx_set(name, data_dir, prefix=f"emnist-{emnist_split}-",
                                                             transpose=True)
        low = min(int(y_tr.min()), int(y_te.min()))  # "letters" counts from 1
        y_tr, y_te = y_tr - low, y_te - low
    else:
        raise UserError(f"unknown dataset {name!r}: choose from {', '.join(DATASETS)}")
    classes = int(max(y_tr.max(), y_te.max())) + 1
    return ImageData(name, torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
                     torch.from_numpy(y_te), classes, source, flip_ok=_FLIP_OK[name])


def available(data_dir: str | None) -> dict[str, str]:
    """The datasets present here: name -> where (or why not)."""
    check_data_dir(data_dir)
    out = {}
    for name in DATASETS:
        try:
            if name == "digits":
                import sklearn  # noqa: F401
                out[name] = "scikit-learn"
            elif name == "cifar10":
                out[name] = next(str(d) for d in _candidate_dirs(name, data_dir) if (d / "test_batch").is_file())
            else:
                prefix = "emnist-balanced-" if name == "emnist" else ""
                out[name] = next(str(d) for d in _candidate_dirs(name, data_dir)
                                 if _idx_pair(d, prefix, "train"))
        except (StopIteration, ImportError):
            continue
    return out


def subset(data: ImageData, train_limit: int | None, test_limit: int | None, seed: int = 0) -> ImageData:
    """The first N of a fixed permutation of each split (same N, same images every run)."""
    def cut(x, y, n):
        if not n or n >= len(y):
            return x, y
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
        return x[idx], y[idx]

    x_tr, y_tr = cut(data.x_train, data.y_train, train_limit)
    x_te, y_te = cut(data.x_test, data.y_test, test_limit)
    return ImageData(data.name, x_tr, y_tr, x_te, y_te, data.num_classes, data.source, data.flip_ok,
                     list(data.mean), list(data.std))
