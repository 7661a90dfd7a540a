"""Small image data sets for ``dpclip train`` and the examples, read from their standard files.

- ``digits``: scikit-learn's embedded 8×8 handwritten digits (no download; needs the ``examples``
  extra), split 80/20 stratified with a fixed seed.
- ``mnist`` / ``fashion-mnist``: the IDX files ``train-images-idx3-ubyte(.gz)`` etc., all four
  from one folder. The two sets share file names and shapes: the published ``.gz`` files of the
  other set are refused (by MD5); uncompressed or recompressed ones cannot be told apart.
- ``cifar10``: the python pickle batches in ``cifar-10-batches-py/``.

Images become float32 tensors of shape (N, C, H, W) scaled to [0, 1] with a fixed (data
independent) map, labels int64. Scaling with statistics of the private training set would leak
information outside the privacy accounting, so none is used.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DATASETS",
    "CorruptDataset",
    "DatasetError",
    "DatasetInfo",
    "DatasetNotFound",
    "default_data_dir",
    "load_dataset",
]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")


class DatasetError(Exception):
    """A data set could not be loaded; the message says why and what to do."""


class DatasetNotFound(DatasetError, FileNotFoundError):
    """The data set's files are not where they were looked for."""


class CorruptDataset(DatasetError, ValueError):
    """A file exists but is not a valid file of the expected format."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    source: str


def default_data_dir() -> Path:
    """``$DPCLIP_DATA`` if set, else ``~/.cache/dpclip/data``."""
    return Path(os.environ.get("DPCLIP_DATA", "~/.cache/dpclip/data")).expanduser()


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = False
) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    """Load ``name`` as (train, test, info); images (N, C, H, W) float32 in [0, 1].

    Files are looked for in ``data_dir/<name>``, then ``data_dir`` (MNIST-format sets: all four
    in one of them, never mixed); with ``download=True`` missing files are fetched from the
    standard public URLs into ``data_dir/<name>`` first.

    Raises:
        ValueError: unknown name.
        DatasetNotFound: files missing, or split between two folders (the message names the
            folders and the ``--download`` fix).
        CorruptDataset: a file is not valid in its format.
        DatasetError: a published file of the other MNIST-format set.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "digits":
        return _load_digits()
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name == "cifar10":
        return _load_cifar10(root, download)
    return _load_idx_set(name, root, download)


# ---------------------------------------------------------------------------------------------
# digits


def _load_digits() -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise DatasetError(
            "the digits data set needs scikit-learn: pip install 'dpclip[examples]'"
        ) from err
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    info = DatasetInfo("digits", (1, 8, 8), 10, "scikit-learn load_digits (embedded)")
    return _tensors(x_tr, y_tr), _tensors(x_te, y_te), info


def _tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: IDX files

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_SOURCES = {
    "mnist": (
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
            "test_images": "9fb629c4189551a2d022fa330f9573f3",
            "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": (
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
            "test_images": "bef4ecab320f06d8554ea6380940ec79",
            "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}
_IDX_DTYPES = {0x08: np.uint8}  # the only type the MNIST-family files use
_IDX_MAX_DIMS = 32  # numpy's least limit (numpy 1)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed if its name ends in ``.gz``) into a numpy array.

    Checks the magic number (two zero bytes, type code, number of dimensions) and that the
    payload holds exactly the product of the dimensions.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise CorruptDataset(f"{path}: cannot read IDX file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise CorruptDataset(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise CorruptDataset(f"{path}: unsupported IDX data type 0x{type_code:02x}")
    if ndim > _IDX_MAX_DIMS:
        raise CorruptDataset(
            f"{path}: IDX header gives {ndim} dimensions, at most {_IDX_MAX_DIMS} supported"
        )
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise CorruptDataset(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise CorruptDataset(
            f"{path}: IDX header says {dims} = {expected} values, file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[type_code], offset=header).reshape(dims)


def _find_idx(stem: str, folder: Path) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_folder(name: str, root: Path, download: bool) -> dict[str, Path]:
    """The four files, all from one folder: ``root/name`` or ``root``, fetched into the first
    with ``download``. Files of two folders are never mixed: they may be of two data sets."""
    folders = [root / name, root]
    found = {f: {key: _find_idx(stem, f) for key, stem in _IDX_FILES.items()} for f in folders}
    complete = next((f for f in folders if all(found[f].values())), None)
    if complete is not None:
        return found[complete]
    if download:
        mirrors, md5s = _IDX_SOURCES[name]
        paths = found[folders[0]]
        for key, stem in _IDX_FILES.items():
            if paths[key] is None:
                paths[key] = root / name / f"{stem}.gz"
                _download([m + f"{stem}.gz" for m in mirrors], paths[key], md5s[key])
        return paths
    held = {f: [_IDX_FILES[k] for k, p in found[f].items() if p] for f in folders}
    if all(held.values()) and all(found[folders[0]][k] or found[folders[1]][k] for k in _IDX_FILES):
        raise DatasetNotFound(
            f"{name}: the four files are split between {folders[0]} ({', '.join(held[folders[0]])})"
            f" and {folders[1]} ({', '.join(held[folders[1]])}); files of two folders may be of two "
            f"data sets, so all four must come from one: put them all in {folders[0]}, or fetch "
            "the missing ones there with download=True (dpclip train --download)"
        )
    base = next((f for f in folders if held[f]), folders[0])
    missing = [stem for key, stem in _IDX_FILES.items() if found[base][key] is None]
    raise DatasetNotFound(
        f"{name}: missing {', '.join(missing)} (.gz or not) in {base}; all four files must be in "
        f"{folders[0]} or all in {folders[1]}: put them there, or fetch them with download=True "
        "(dpclip train --download)"
    )


def _refuse_the_other_set(name: str, paths: dict[str, Path]) -> None:
    """MNIST and Fashion-MNIST files have the same names and shapes; the published .gz files are
    told apart by their MD5. Uncompressed or recompressed files cannot be, and are taken as they
    are."""
    other = next(n for n in _IDX_SOURCES if n != name)
    for key, path in paths.items():
        if path.suffix == ".gz" and _md5(path) == _IDX_SOURCES[other][1][key]:
            raise CorruptDataset(
                f"{path} is the {other} file, not {name}'s: put the {name} files in "
                f"{path.parent}, or remove the {other} files there and fetch {name}'s with "
                "download=True (dpclip train --download)"
            )


def _load_idx_set(
    name: str, root: Path, download: bool
) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    found = _idx_folder(name, root, download)
    _refuse_the_other_set(name, found)
    splits = []
    for split in ("train", "test"):
        images = read_idx(found[f"{split}_images"])
        labels = read_idx(found[f"{split}_labels"])
        if images.ndim != 3 or labels.ndim != 1:
            raise CorruptDataset(
                f"{name}: expected 3-d images and 1-d labels, got shapes {images.shape} and "
                f"{labels.shape} ({found[f'{split}_images']}, {found[f'{split}_labels']})"
            )
        if 0 in images.shape[1:]:
            raise CorruptDataset(
                f"{name}: {split} images of {images.shape[1]}×{images.shape[2]} pixels "
                f"({found[f'{split}_images']})"
            )
        if len(images) != len(labels):
            raise CorruptDataset(f"{name}: {len(images)} {split} images but {len(labels)} labels")
        _check_labels(name, labels, 10)
        splits.append(_tensors((images / np.float32(255.0))[:, None], labels.astype(np.int64)))
    height, width = splits[0].tensors[0].shape[2:]
    if splits[1].tensors[0].shape[2:] != (height, width):
        raise CorruptDataset(
            f"{name}: train images are {height}×{width} but test images "
            f"{tuple(splits[1].tensors[0].shape[2:])} ({found['train_images']}, "
            f"{found['test_images']}): the files are not from one data set"
        )
    info = DatasetInfo(name, (1, int(height), int(width)), 10, str(found["train_images"].parent))
    return splits[0], splits[1], info


def _check_labels(name: str, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDataset(f"{name}: labels outside 0..{num_classes - 1}")


# ---------------------------------------------------------------------------------------------
# CIFAR-10: python pickle batches

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, strings, numbers and numpy arrays: a data file must not
    be able to run code."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.ndarray.__reduce__(np.empty(0))[0]  # numpy's own array reconstructor
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            return np.ndarray.__reduce_ex__(np.empty(0), 5)[0]  # the same, at protocol 5
        if (module, name) == ("_codecs", "encode"):  # how python 3 pickles bytes at protocol 2
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch file: (images uint8 (n, 3, 32, 32), labels int64 (n,))."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except OSError as err:
        raise CorruptDataset(f"{path}: cannot read ({err.strerror or err})") from err
    except Exception as err:  # a damaged pickle fails in many ways, all of them "not a batch"
        raise CorruptDataset(f"{path}: not a CIFAR-10 python batch ({err})") from err
    if not isinstance(batch, dict):
        raise CorruptDataset(f"{path}: not a CIFAR-10 python batch (no dictionary)")
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise CorruptDataset(f"{path}: CIFAR-10 batch lacks 'data' array or 'labels'")
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError, OverflowError) as err:  # e.g. lists of unequal lengths
        raise CorruptDataset(f"{path}: CIFAR-10 labels are not a list of integers") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptDataset(
            f"{path}: expected uint8 data of shape (n, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptDataset(f"{path}: expected {len(data)} integer labels, got {labels.shape}")
    _check_labels("cifar10", labels, 10)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load_cifar10(root: Path, download: bool) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    folders = [root / _CIFAR_DIR, root / "cifar10" / _CIFAR_DIR]
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    folder = next((f for f in folders if all((f / n).is_file() for n in names)), None)
    if folder is None and download:
        archive = root / "cifar10" / "cifar-10-python.tar.gz"
        _download([_CIFAR_URL], archive, _CIFAR_MD5)
        # The "data" filter refuses links and absolute paths; older Pythons lack it (the archive
        # has just passed its checksum).
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root / "cifar10", **safe)
        folder = folders[1]
    if folder is None:
        raise DatasetNotFound(
            f"cifar10: missing {_CIFAR_DIR}/{{data_batch_1..5, test_batch}} in {root}; "
            "extract cifar-10-python.tar.gz there, or fetch it with download=True (dpclip train --download)"
        )
    train = [read_cifar_batch(folder / n) for n in _CIFAR_TRAIN]
    x_te, y_te = read_cifar_batch(folder / _CIFAR_TEST)
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    scale = np.float32(255.0)
    info = DatasetInfo("cifar10", (3, 32, 32), 10, str(folder))
    return _tensors(x_tr / scale, y_tr), _tensors(x_te / scale, y_te), info


# ---------------------------------------------------------------------------------------------
# download


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # the published checksums are MD5 (integrity)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(urls: list[str], target: Path, md5: str) -> None:
    """Fetch the first URL that works into ``target`` (via a temporary file), checking its MD5."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, out)
            if _md5(tmp) != md5:
                raise CorruptDataset(f"{url}: checksum mismatch (expected MD5 {md5})")
            os.replace(tmp, target)
            return
        except (OSError, CorruptDataset) as err:
            errors.append(f"{url}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DatasetNotFound(f"could not download {target.name}: " + "; ".join(errors))
