"""Datasets for the experiments: the UCI regression splits and the MNIST family.

Where the files are
-------------------
A *data directory* holds ``uci/<name>/data/...`` (the Hernandez-Lobato & Adams split layout:
``data.txt``, ``index_features.txt``, ``index_target.txt``, ``n_splits.txt``,
``index_train_<i>.txt``, ``index_test_<i>.txt``), ``mnist/`` and ``fashion_mnist/`` (the official
idx ``.gz`` files). :func:`resolve_data_dir` picks it: an explicit path, else the environment
variable ``PYVARINF2_DATA``, else the small data set shipped inside the package
(:data:`EMBEDDED_DIR`, which holds only ``yacht``, its files named ``yacht_<file>``).
Nothing is ever downloaded.

The dataset ``embedded`` (alias ``default``) always reads the shipped copy of UCI yacht.

MNIST-family files are parsed directly with numpy (gzip + the idx header), not through
``torchvision.datasets``: torchvision insists on its own ``root/<Class>/raw`` layout and would try
to download when that is missing, while the idx format is four big-endian integers and a byte
array, so a direct reader is simpler, needs no symlink cache and cannot reach the network.

Every check raises :class:`DataError` (a ``ValueError``) naming the dataset, the file and the
directory, before anything is loaded.
"""
import gzip
import os
import pathlib
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "DataError", "EMBEDDED_DIR", "EMBEDDED_NAME", "UCI_DATASETS", "IMAGE_DATASETS",
    "resolve_data_dir", "dataset_kind", "known_datasets", "check_dataset", "uci_n_splits",
    "load_uci", "load_image_dataset", "read_idx", "RegressionData", "ClassificationData",
    "load_dataset",
]

EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent / "datasets"
EMBEDDED_NAME = "yacht"
EMBEDDED_ALIASES = ("embedded", "default")

UCI_DATASETS = (
    "bostonHousing", "concrete", "energy", "kin8nm", "naval-propulsion-plant", "power-plant",
    "protein-tertiary-structure", "wine-quality-red", "yacht",
)
IMAGE_DATASETS = ("mnist", "fashion_mnist")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_COUNTS = {"train": 60000, "test": 10000}


class DataError(ValueError):
    """A dataset is unknown, or its files are missing or malformed."""


def resolve_data_dir(data_dir=None):
    """The data directory: ``data_dir``, else ``$PYVARINF2_DATA``, else the shipped copy."""
    if data_dir is not None and str(data_dir) != "":
        return pathlib.Path(data_dir).expanduser()
    env = os.environ.get("PYVARINF2_DATA")
    if env:
        return pathlib.Path(env).expanduser()
    return EMBEDDED_DIR


def known_datasets():
    return list(EMBEDDED_ALIASES) + list(IMAGE_DATASETS) + list(UCI_DATASETS)


def dataset_kind(name):
    """``'regression'`` or ``'classification'``; raises :class:`DataError` for unknown names."""
    if name in EMBEDDED_ALIASES or name in UCI_DATASETS:
        return "regression"
    if name in IMAGE_DATASETS:
        return "classification"
    raise DataError(f"unknown dataset {name!r}; expected one of {known_datasets()}")


# ---------------------------------------------------------------------------------------- UCI
_UCI_BASE_FILES = ("data.txt", "index_features.txt", "index_target.txt", "n_splits.txt")


def _uci_locate(name, data_dir):
    """Return ``(shown_name, function file -> path)`` for UCI set ``name`` under ``data_dir``.

    Layouts tried, in order: ``<dir>/uci/<name>/data/<file>``, ``<dir>/<name>/data/<file>``
    (``dir`` is the ``uci`` folder itself), and the flat shipped layout ``<dir>/<name>_<file>``.
    """
    if name in EMBEDDED_ALIASES:
        root, real = EMBEDDED_DIR, EMBEDDED_NAME
    else:
        root, real = pathlib.Path(data_dir), name
    candidates = [
        lambda f: root / "uci" / real / "data" / f,
        lambda f: root / real / "data" / f,
        lambda f: root / f"{real}_{f}",
    ]
    for where in candidates:
        if where("data.txt").is_file():
            return real, where
    return real, candidates[0]


def _read_ints(path, what):
    try:
        values = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {what} from {path}: {exc}") from None
    return values


def uci_n_splits(name, data_dir=None):
    """Number of train/test splits of UCI set ``name`` (from its ``n_splits.txt``)."""
    dataset_kind(name)
    real, where = _uci_locate(name, resolve_data_dir(data_dir))
    path = where("n_splits.txt")
    if not path.is_file():
        raise DataError(f"dataset {name!r}: file n_splits.txt not found at {path}")
    n = _read_ints(path, "the number of splits")
    if n.size != 1 or n[0] < 1:
        raise DataError(f"dataset {name!r}: {path} should hold one integer >= 1")
    return int(n[0])


def _check_uci(name, data_dir, splits):
    real, where = _uci_locate(name, data_dir)
    missing = [str(where(f)) for f in _UCI_BASE_FILES if not where(f).is_file()]
    if missing:
        raise DataError(f"dataset {name!r} not found in data directory {data_dir}: missing "
                        f"{', '.join(missing)}")
    n = uci_n_splits(name, data_dir)
    splits = range(n) if splits is None else splits
    for s in splits:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < n:
            raise DataError(f"dataset {name!r} has splits 0..{n - 1}; split {s!r} does not exist")
        for part in ("train", "test"):
            path = where(f"index_{part}_{s}.txt")
            if not path.is_file():
                raise DataError(f"dataset {name!r}: split file {path} not found")
    return n


@dataclass
class RegressionData:
    """One UCI train/test split, normalised with the training statistics.

    ``x_*`` and ``y_*`` are float32 tensors of shapes ``(n, d)`` and ``(n,)`` in normalised
    units; ``y_mean``/``y_std`` map predictions back: ``y = y_norm * y_std + y_mean``.
    """
    name: str
    split: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float
    y_std: float
    kind: str = field(default="regression")

    @property
    def n_train(self):
        return int(self.x_train.shape[0])

    @property
    def in_features(self):
        return int(self.x_train.shape[1])

    @property
    def y_test_original(self):
        return self.y_test * self.y_std + self.y_mean


def load_uci(name, split=0, data_dir=None):
    """Load split ``split`` of UCI set ``name``, normalising inputs and target with the mean and
    (population) standard deviation of the training part; constant features keep std 1."""
    dataset_kind(name)
    if name in IMAGE_DATASETS:
        raise DataError(f"dataset {name!r} is not a UCI regression set")
    data_dir = resolve_data_dir(data_dir)
    _check_uci(name, data_dir, [split])
    real, where = _uci_locate(name, data_dir)
    path = where("data.txt")
    try:
        data = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"dataset {name!r}: cannot parse {path}: {exc}") from None
    features = _read_ints(where("index_features.txt"), "feature indices")
    target = _read_ints(where("index_target.txt"), "the target index")
    train = _read_ints(where(f"index_train_{split}.txt"), "training indices")
    test = _read_ints(where(f"index_test_{split}.txt"), "test indices")
    n_rows, n_cols = data.shape
    for what, idx, bound in (("feature", features, n_cols), ("target", target, n_cols),
                             ("training", train, n_rows), ("test", test, n_rows)):
        if idx.size == 0 or idx.min() < 0 or idx.max() >= bound:
            raise DataError(f"dataset {name!r}: {what} indices out of range 0..{bound - 1} "
                            f"in {where('data.txt').parent}")
    if target.size != 1:
        raise DataError(f"dataset {name!r}: index_target.txt must hold one column index")
    if not np.isfinite(data[:, np.r_[features, target]]).all():
        raise DataError(f"dataset {name!r}: {path} holds non-finite values")
    x, y = data[:, features], data[:, target[0]]
    x_tr, y_tr, x_te, y_te = x[train], y[train], x[test], y[test]
    x_mean, x_std = x_tr.mean(0), x_tr.std(0)
    x_std = np.where(x_std > 0, x_std, 1.0)
    y_mean, y_std = float(y_tr.mean()), float(y_tr.std())
    if not y_std > 0:
        y_std = 1.0

    def t(a):
        return torch.as_tensor(a, dtype=torch.float32)

    return RegressionData(name=real if name in EMBEDDED_ALIASES else name, split=int(split),
                          x_train=t((x_tr - x_mean) / x_std), y_train=t((y_tr - y_mean) / y_std),
                          x_test=t((x_te - x_mean) / x_std), y_test=t((y_te - y_mean) / y_std),
                          x_mean=x_mean, x_std=x_std, y_mean=y_mean, y_std=y_std)


# ------------------------------------------------------------------------------- MNIST family
def read_idx(path):
    """Read an idx file (optionally gzip-compressed) into a numpy array (uint8 data only)."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read idx file {path}: {exc}") from None
    if len(raw) < 4:
        raise DataError(f"{path} is not an idx file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim < 1:
        raise DataError(f"{path} is not an unsigned-byte idx file (header {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise DataError(f"{path}: idx header announces {dims} = {count} bytes, file holds "
                        f"{len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _image_paths(name, data_dir):
    folder = pathlib.Path(data_dir) / name
    return {part: tuple(folder / f for f in files) for part, files in _IDX_FILES.items()}


def _check_image(name, data_dir):
    paths = _image_paths(name, data_dir)
    missing = [str(p) for pair in paths.values() for p in pair if not p.is_file()]
    if missing:
        raise DataError(f"dataset {name!r} not found in data directory {data_dir}: missing "
                        f"{', '.join(missing)}")


@dataclass
class ClassificationData:
    """Images as float32 ``(n, 1, 28, 28)`` in [0, 1] and int64 labels."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int = 10
    kind: str = field(default="classification")

    @property
    def n_train(self):
        return int(self.x_train.shape[0])

    @property
    def in_shape(self):
        return tuple(self.x_train.shape[1:])


def load_image_dataset(name, data_dir=None, parts=("train", "test"), limits=None):
    """Load ``mnist`` or ``fashion_mnist`` from the idx files; pixels scaled to [0, 1].

    ``limits``: ``{"train": n, "test": m}`` keeps the first n / m examples of a part."""
    limits = limits or {}
    if name not in IMAGE_DATASETS:
        raise DataError(f"unknown image dataset {name!r}; expected one of {list(IMAGE_DATASETS)}")
    data_dir = resolve_data_dir(data_dir)
    _check_image(name, data_dir)
    paths = _image_paths(name, data_dir)
    out = {}
    for part in parts:
        img_path, lab_path = paths[part]
        images, labels = read_idx(img_path), read_idx(lab_path)
        n = _IDX_COUNTS[part]
        if images.shape != (n, 28, 28) or labels.shape != (n,):
            raise DataError(f"dataset {name!r} {part}: expected {n} images of 28x28 and {n} "
                            f"labels, got {images.shape} and {labels.shape} in {img_path.parent}")
        if labels.max() > 9:
            raise DataError(f"dataset {name!r} {part}: labels outside 0..9 in {lab_path}")
        keep = limits.get(part)
        if keep is not None:
            images, labels = images[:keep], labels[:keep]
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        out[part] = (x, torch.from_numpy(labels.astype(np.int64)))
    empty = (torch.empty(0, 1, 28, 28), torch.empty(0, dtype=torch.int64))
    x_tr, y_tr = out.get("train", empty)
    x_te, y_te = out.get("test", empty)
    return ClassificationData(name=name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)


# ------------------------------------------------------------------------------------ generic
def check_dataset(name, data_dir=None, splits=None):
    """Check that ``name`` is known and its files are present (cheap: no parsing of the data).

    ``splits`` (UCI only): the split numbers that will be used (default all)."""
    kind = dataset_kind(name)
    data_dir = resolve_data_dir(data_dir)
    if kind == "classification":
        _check_image(name, data_dir)
    else:
        _check_uci(name, data_dir, splits)
    return kind


def load_dataset(name, data_dir=None, split=0, train_subset=None, test_subset=None,
                 parts=("train", "test")):
    """Load any known dataset; ``train_subset``/``test_subset`` keep the first n examples.
    ``parts`` (image datasets) skips decoding a part that is not needed (e.g. for evaluation;
    a UCI split always has both, its normalisation comes from the training part)."""
    kind = dataset_kind(name)
    if kind == "regression":
        data = load_uci(name, split=split, data_dir=data_dir)
    else:
        data = load_image_dataset(name, data_dir=data_dir, parts=parts,
                                  limits={"train": train_subset, "test": test_subset})
    if train_subset is not None:
        data.x_train, data.y_train = data.x_train[:train_subset], data.y_train[:train_subset]
    if test_subset is not None:
        data.x_test, data.y_test = data.x_test[:test_subset], data.y_test[:test_subset]
    return data
