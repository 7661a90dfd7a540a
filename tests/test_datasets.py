"""Dataset loaders read the real file formats (IDX, CIFAR-10 python batches) written here in tiny size."""

import gzip
import pickle
import sys

import numpy as np
import pytest
import torch

from dpclip.datasets import (
    CorruptDataset,
    DatasetError,
    DatasetNotFound,
    load_dataset,
    read_cifar_batch,
    read_idx,
)

IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: 0, 0, type code 0x08 (ubyte), ndim, then big-endian int32 dims, then data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def _write_idx(path, array, gz):
    data = _idx_bytes(array)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _idx_set(folder, n_train=6, n_test=4, side=28, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_STEMS.items():
        _write_idx(folder / stem, arrays[key], gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loader_reads_images_and_labels_exactly(tmp_path, name, gz):
    arrays = _idx_set(tmp_path, gz=gz)
    train, test, info = load_dataset(name, data_dir=tmp_path)
    x, y = train.tensors
    assert x.dtype == torch.float32 and x.shape == (6, 1, 28, 28)
    assert y.dtype == torch.int64
    expected = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255)[:, None]
    assert torch.equal(x, expected)
    assert y.tolist() == arrays["train_labels"].tolist()
    assert test.tensors[1].tolist() == arrays["test_labels"].tolist()
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10 and info.name == name


def test_idx_loader_finds_files_in_the_dataset_subfolder(tmp_path):
    _idx_set(tmp_path / "fashion-mnist", side=5)
    train, test, info = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert train.tensors[0].shape == (6, 1, 5, 5) and info.input_shape == (1, 5, 5)
    assert float(train.tensors[0].min()) >= 0.0 and float(train.tensors[0].max()) <= 1.0


def test_train_and_test_images_of_different_sizes_are_refused_before_training(tmp_path):
    """Same pixel count, other shape: the model would be scored on reshaped images."""
    arrays = _idx_set(tmp_path)
    _write_idx(tmp_path / IDX_STEMS["test_images"], arrays["test_images"].reshape(4, 14, 56), True)
    with pytest.raises(CorruptDataset, match="train images are 28×28 but test images"):
        load_dataset("mnist", data_dir=tmp_path)


def test_read_idx_returns_the_stored_array(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a", a, gz=False)
    _write_idx(tmp_path / "b", a, gz=True)
    assert np.array_equal(read_idx(tmp_path / "a"), a)
    assert np.array_equal(read_idx(tmp_path / "b.gz"), a)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x08\x03\x00\x00" + bytes(16), "bad magic number"),
        (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + bytes(4), "unsupported IDX data type 0x0d"),
        (bytes([0, 0, 8, 3, 0, 0]), "truncated IDX header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), r"says \(5,\) = 5 values, file holds 2"),
        # 2⁶⁴ values: the product wrapped to 0 in int64 and matched the empty payload
        (bytes([0, 0, 8, 4]) + bytes([0, 1, 0, 0]) * 4, r"= 18446744073709551616 values, file"),
        (bytes([0, 0, 8, 200]) + bytes(800), "IDX header gives 200 dimensions, at most 32"),
    ],
)
def test_corrupt_idx_file_raises_with_the_reason(tmp_path, payload, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(payload)
    with pytest.raises(CorruptDataset, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_broken_gzip_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(CorruptDataset, match="cannot read IDX file"):
        read_idx(path)


def test_damaged_deflate_stream_is_reported_as_corrupt(tmp_path):
    """zlib.error is no OSError: it used to escape as a raw traceback."""
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    packed = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 1, 0]) + bytes(256))
    path.write_bytes(packed[:10] + b"\xff" * 10 + packed[20:])
    with pytest.raises(CorruptDataset, match="cannot read IDX file"):
        read_idx(path)


def test_images_without_pixels_are_corrupt(tmp_path):
    _idx_set(tmp_path, gz=False)
    _write_idx(tmp_path / IDX_STEMS["train_images"], np.zeros((6, 0, 0), np.uint8), gz=False)
    with pytest.raises(CorruptDataset, match="train images of 0×0 pixels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_image_label_count_mismatch_is_corrupt(tmp_path):
    _idx_set(tmp_path, gz=False)
    _write_idx(tmp_path / IDX_STEMS["train_labels"], np.zeros(5, np.uint8), gz=False)
    with pytest.raises(CorruptDataset, match="6 train images but 5 labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_labels_out_of_range_are_corrupt(tmp_path):
    _idx_set(tmp_path, gz=False)
    _write_idx(tmp_path / IDX_STEMS["test_labels"], np.full(4, 12, np.uint8), gz=False)
    with pytest.raises(CorruptDataset, match=r"labels outside 0\.\.9"):
        load_dataset("mnist", data_dir=tmp_path)


def test_swapped_image_and_label_files_are_corrupt(tmp_path):
    arrays = _idx_set(tmp_path, gz=False)
    _write_idx(tmp_path / IDX_STEMS["train_images"], arrays["train_labels"], gz=False)
    with pytest.raises(CorruptDataset, match="expected 3-d images and 1-d labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_missing_idx_files_say_where_to_put_them_and_how_to_download(tmp_path):
    (tmp_path / "mnist").mkdir()
    _write_idx(tmp_path / "mnist" / IDX_STEMS["train_images"], np.zeros((1, 2, 2)), gz=False)
    with pytest.raises(DatasetNotFound) as err:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(err.value)
    assert "t10k-images-idx3-ubyte" in message and "train-images" not in message
    assert str(tmp_path / "mnist") in message and "--download" in message
    assert "\n" not in message
    assert isinstance(err.value, FileNotFoundError)


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_idx_files_split_between_two_folders_are_refused_not_mixed(tmp_path):
    """Three files in ROOT/mnist, the fourth in ROOT: they may be of two data sets."""
    _idx_set(tmp_path / "mnist")
    (tmp_path / "mnist" / f"{IDX_STEMS['test_labels']}.gz").rename(
        tmp_path / f"{IDX_STEMS['test_labels']}.gz"
    )
    before = _listing(tmp_path)
    with pytest.raises(DatasetNotFound) as err:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(err.value)
    assert f"the four files are split between {tmp_path / 'mnist'} (train-images" in message
    assert f"and {tmp_path} (t10k-labels-idx1-ubyte)" in message
    assert "put them all in" in message and "--download" in message and "\n" not in message
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("complete", ["root", "subfolder"])
def test_all_four_idx_files_come_from_the_one_complete_folder(tmp_path, complete):
    """A stray file in the other folder used to replace the complete folder's own."""
    full, stray = (tmp_path, tmp_path / "mnist")
    if complete == "subfolder":
        full, stray = stray, full
    arrays = _idx_set(full, seed=0)
    stray.mkdir(exist_ok=True)
    _write_idx(stray / IDX_STEMS["train_images"], np.zeros((6, 28, 28), np.uint8), gz=False)
    train, _, info = load_dataset("mnist", data_dir=tmp_path)
    expected = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255)[:, None]
    assert torch.equal(train.tensors[0], expected) and info.source == str(full)


def test_fashion_mnist_refuses_the_published_mnist_files_and_mnist_the_fashion_ones(
    tmp_path, monkeypatch
):
    """The two sets share names and shapes; the published .gz files differ in MD5. Our tiny files
    stand in for the published ones by taking their place among the known checksums."""
    from dpclip import datasets

    _idx_set(tmp_path)
    ours = {key: datasets._md5(tmp_path / f"{stem}.gz") for key, stem in IDX_STEMS.items()}
    sources = datasets._IDX_SOURCES
    monkeypatch.setitem(sources, "mnist", (sources["mnist"][0], ours))
    load_dataset("mnist", data_dir=tmp_path)  # its own files
    before = _listing(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(err.value).startswith(
        f"{tmp_path / 'train-images-idx3-ubyte.gz'} is the mnist file, not fashion-mnist's"
    )
    assert "--download" in str(err.value) and _listing(tmp_path) == before

    monkeypatch.setitem(sources, "mnist", (sources["mnist"][0], dict.fromkeys(ours, "0" * 32)))
    monkeypatch.setitem(sources, "fashion-mnist", (sources["fashion-mnist"][0], ours))
    load_dataset("fashion-mnist", data_dir=tmp_path)
    with pytest.raises(DatasetError, match="is the fashion-mnist file, not mnist's"):
        load_dataset("mnist", data_dir=tmp_path)


def test_the_published_mnist_and_fashion_mnist_checksums_differ_file_by_file():
    from dpclip.datasets import _IDX_SOURCES

    mnist, fashion = _IDX_SOURCES["mnist"][1], _IDX_SOURCES["fashion-mnist"][1]
    assert mnist.keys() == fashion.keys() == IDX_STEMS.keys()
    assert not set(mnist.values()) & set(fashion.values())


# --------------------------------------------------------------------------------------- CIFAR


def _cifar_batch(path, n, seed, protocol=2):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    # The real files are python-2 pickles with byte-string keys, at protocol 2.
    with open(path, "wb") as fh:
        pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels}, fh, protocol=protocol)
    return data, labels


def _cifar_set(root, n=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = [_cifar_batch(folder / f"data_batch_{k}", n, k) for k in range(1, 6)]
    test = _cifar_batch(folder / "test_batch", n, 99)
    return folder, train, test


def test_cifar10_loader_reads_all_python_batches_in_channel_major_order(tmp_path):
    _, train_batches, (test_data, test_labels) = _cifar_set(tmp_path)
    train, test, info = load_dataset("cifar10", data_dir=tmp_path)
    x, y = train.tensors
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == sum((labels for _, labels in train_batches), [])
    # Row layout of the real files: 1024 red, then 1024 green, then 1024 blue, each row-major.
    first = train_batches[0][0][0]
    assert x[0, 1, 2, 5].item() == pytest.approx(first[1024 + 2 * 32 + 5] / 255)
    assert x[0, 2, 31, 0].item() == pytest.approx(first[2048 + 31 * 32] / 255)
    assert torch.equal(
        test.tensors[0].reshape(3, -1), torch.from_numpy(test_data / np.float32(255))
    )
    assert test.tensors[1].tolist() == test_labels
    assert info.input_shape == (3, 32, 32)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_read_cifar_batch_accepts_numpy_pickles(tmp_path, protocol):
    data, labels = _cifar_batch(tmp_path / "b", 2, 0, protocol=protocol)
    images, got = read_cifar_batch(tmp_path / "b")
    assert np.array_equal(images.reshape(2, -1), data) and got.tolist() == labels


class _Exploit:
    def __reduce__(self):
        return (sys.exit, ("pickle ran code",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}, protocol=2))
    with pytest.raises(CorruptDataset, match="refusing to load sys.exit"):
        read_cifar_batch(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "not a CIFAR-10 python batch"),
        (pickle.dumps([1, 2], protocol=2), "no dictionary"),
        (pickle.dumps({b"labels": [1]}, protocol=2), "lacks 'data'"),
        (pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]}), r"\(n, 3072\)"),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}),
            "2 integer labels",
        ),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[1], [1, 2]]}),
            "labels are not a list of integers",
        ),
        # codecs.encode with an unknown encoding raises LookupError, which used to escape
        (
            b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00nopex\x86R.",
            "unknown encoding",
        ),
    ],
)
def test_corrupt_cifar_batch_raises_with_the_reason(tmp_path, content, message):
    path = tmp_path / "test_batch"
    path.write_bytes(content)
    with pytest.raises(CorruptDataset, match=message):
        read_cifar_batch(path)


def test_missing_cifar_batches_say_where_to_put_them(tmp_path):
    folder, _, _ = _cifar_set(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFound) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "cifar-10-batches-py" in str(err.value) and str(tmp_path) in str(err.value)
    assert "--download" in str(err.value)


# -------------------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_stratified_and_scaled_to_unit_interval():
    pytest.importorskip("sklearn")
    train, test, info = load_dataset("digits")
    x, y = train.tensors
    assert x.shape == (1437, 1, 8, 8) and test.tensors[0].shape == (360, 1, 8, 8)
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() == 1
    assert info.input_shape == (1, 8, 8) and info.num_classes == 10
    # Stratified: every class holds ~20% of its examples in the test split.
    counts_test = torch.bincount(test.tensors[1], minlength=10).float()
    counts_all = counts_test + torch.bincount(y, minlength=10).float()
    assert ((counts_test / counts_all - 0.2).abs() < 0.01).all()
    again, _, _ = load_dataset("digits")
    assert torch.equal(again.tensors[0], x) and torch.equal(again.tensors[1], y)


def test_digits_without_scikit_learn_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DatasetError, match=r"pip install 'dpclip\[examples\]'"):
        load_dataset("digits")


def test_unknown_dataset_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; expected one of digits, mnist"):
        load_dataset("svhn")
