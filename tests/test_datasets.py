"""Data sets: tiny fake files in every on-disk format round-trip; bad and malicious files are
refused; missing data says where it looked; the label transforms keep their invariants; the real
digits (and Fashion-MNIST, where installed) load with their known sizes."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tinysubspace.problems.datasets import catalog as datasets
from tinysubspace.problems.datasets.catalog import (
    DatasetNotFoundError,
    TensorData,
    dataset_names,
    even_odd,
    gaussian_mixture_means,
    load_dataset,
    random_labels,
    standardize,
    subset,
)
from tinysubspace.problems.datasets.files import UnsafePickleError, read_idx, safe_unpickle

FASHION = Path("/usr/share/datasets/fashion-mnist")


# -------------------------------------------------------------------------------- file writers
def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file (gzip-compressed when the name ends in .gz)."""
    code = {np.dtype("uint8"): 0x08, np.dtype("int32"): 0x0C, np.dtype("float32"): 0x0D}
    header = bytes([0, 0, code[array.dtype], array.ndim])
    payload = header + np.asarray(array.shape, ">u4").tobytes() + \
        array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def fake_idx_set(folder: Path, prefix: str, n: int, seed: int, gz: bool = False):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    ext = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


def write_pickle(path: Path, obj: object, protocol: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def fake_cifar_batch(n: int, seed: int, label_keys: dict[str, int], byte_keys: bool = True):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    batch = {"batch_label": b"fake", "data": data,
             "filenames": [f"img{i}.png".encode() for i in range(n)]}
    labels = {key: [int(v) for v in rng.integers(0, k, size=n)] for key, k in label_keys.items()}
    batch.update(labels)
    if byte_keys:  # as the real (Python 2) files load with encoding="bytes"
        batch = {key.encode(): value for key, value in batch.items()}
    return batch, data, labels


# ------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    images, labels = fake_idx_set(tmp_path, "train", 5, seed=0, gz=gz)
    test_images, test_labels = fake_idx_set(tmp_path, "t10k", 3, seed=1, gz=gz)
    train = load_dataset("mnist", root=tmp_path)
    assert train.inputs.shape == (5, 1, 28, 28) and train.inputs.dtype == torch.float32
    assert torch.equal(train.inputs[:, 0] * 255, torch.from_numpy(images).float())
    assert train.targets.dtype == torch.int64
    assert train.targets.tolist() == labels.tolist()
    assert (train.num_classes, train.name) == (10, "mnist-train")
    test = load_dataset("mnist", root=tmp_path, split="test")
    assert len(test) == 3 and test.targets.tolist() == test_labels.tolist()
    assert float(test.inputs.max()) == test_images.max() / 255


def test_torchvision_layout_and_dotted_names(tmp_path):
    _, labels = fake_idx_set(tmp_path / "FashionMNIST" / "raw", "train", 4, seed=2, gz=True)
    assert load_dataset("fashion-mnist", root=tmp_path).targets.tolist() == labels.tolist()
    rng = np.random.default_rng(3)
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-images.idx3-ubyte",
              rng.integers(0, 256, (2, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-labels.idx1-ubyte", np.array([7, 1], np.uint8))
    assert load_dataset("mnist", root=tmp_path, split="test").targets.tolist() == [7, 1]


def test_read_idx_other_types_and_errors(tmp_path):
    values = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    assert np.array_equal(read_idx(write_idx(tmp_path / "f.gz", values)), values)
    ints = np.array([1, -70000, 3], dtype=np.int32)
    assert np.array_equal(read_idx(write_idx(tmp_path / "i", ints)), ints)
    (tmp_path / "bad").write_bytes(b"\x01\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "type").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="unknown IDX element type 0x07"):
        read_idx(tmp_path / "type")
    good = write_idx(tmp_path / "short", np.zeros((2, 28, 28), np.uint8)).read_bytes()
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(ValueError, match=r"\(2, 28, 28\) of uint8 \(1584 bytes.*has 1583 bytes"):
        read_idx(tmp_path / "short")


def test_mismatched_images_and_labels_are_refused(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="3 images in train-images-idx3-ubyte but labels of"):
        load_dataset("mnist", root=tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 2, 10], np.uint8))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\), got \[1, 10\]"):
        load_dataset("mnist", root=tmp_path)


def test_missing_mnist_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="fallback_to_test=True") as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for folder in (tmp_path, tmp_path / "MNIST" / "raw", tmp_path / "mnist"):
        assert str(folder / "train-images-idx3-ubyte.gz") in message
    assert "Download the four IDX files" in message
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=tmp_path, split="test")


def test_default_places_env_then_system(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "SYSTEM_DATA", tmp_path / "system")
    monkeypatch.setenv(datasets.DATA_ENV, str(tmp_path / "mine"))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist")
    assert str(tmp_path / "mine" / "mnist" / "train-images-idx3-ubyte") in str(info.value)
    assert str(tmp_path / "system" / "MNIST" / "raw") in str(info.value)
    _, labels = fake_idx_set(tmp_path / "system" / "mnist", "train", 2, seed=4)
    assert load_dataset("mnist").targets.tolist() == labels.tolist()


def test_fallback_to_test_only_when_asked(tmp_path):
    _, labels = fake_idx_set(tmp_path, "t10k", 3, seed=5)
    with pytest.raises(DatasetNotFoundError, match="train files"):
        load_dataset("fashion-mnist", root=tmp_path)
    data = load_dataset("fashion-mnist", root=tmp_path, fallback_to_test=True)
    assert data.name == "fashion-mnist-test(as train)"
    assert data.targets.tolist() == labels.tolist()


# ----------------------------------------------------------------------------------- CIFAR
def test_cifar10_round_trip(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    expected_images, expected_labels = [], []
    for i in range(1, 6):
        batch, data, labels = fake_cifar_batch(2, seed=i, label_keys={"labels": 10})
        write_pickle(folder / f"data_batch_{i}", batch, protocol=2 if i % 2 else 5)
        expected_images.append(data)
        expected_labels += labels["labels"]
    batch, test_data, test_labels = fake_cifar_batch(3, seed=9, label_keys={"labels": 10})
    write_pickle(folder / "test_batch", batch, protocol=2)
    train = load_dataset("cifar10", root=tmp_path)
    assert train.inputs.shape == (10, 3, 32, 32) and train.inputs.dtype == torch.float32
    pixels = np.concatenate(expected_images).reshape(10, 3, 32, 32)
    assert torch.equal(train.inputs * 255, torch.from_numpy(pixels).float())
    assert train.targets.tolist() == expected_labels and train.num_classes == 10
    test = load_dataset("cifar10", root=folder, split="test")  # root may be the folder itself
    assert test.targets.tolist() == test_labels["labels"]
    # channel-major rows: the first 1024 bytes are the red plane
    assert torch.equal(test.inputs[0, 0].reshape(-1) * 255, torch.from_numpy(test_data[0, :1024])
                       .float())


def test_pickle_naming_numpy_core_loads(tmp_path):
    """The real CIFAR files name ``numpy.core.multiarray._reconstruct`` (numpy 1); it must
    load under numpy 2, where that module moved to ``numpy._core``."""
    data = np.arange(3072, dtype=np.int64).astype(np.uint8).reshape(1, 3072)
    raw = pickle.dumps({b"data": data, b"labels": [4]}, protocol=2)
    old = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert old != raw
    (tmp_path / "batch").write_bytes(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = safe_unpickle(tmp_path / "batch")
    assert np.array_equal(loaded[b"data"], data) and loaded[b"labels"] == [4]


@pytest.mark.parametrize("labels", ["fine", "coarse"])
def test_cifar100_round_trip(tmp_path, labels):
    keys = {"fine_labels": 100, "coarse_labels": 20}
    folder = tmp_path / "cifar-100-python"
    batch, _, truth = fake_cifar_batch(4, seed=1, label_keys=keys, byte_keys=False)
    write_pickle(folder / "train", batch, protocol=4)
    train = load_dataset("cifar100", root=tmp_path, labels=labels)
    assert train.inputs.shape == (4, 3, 32, 32)
    assert train.targets.tolist() == truth[f"{labels}_labels"]
    assert train.num_classes == keys[f"{labels}_labels"]


class Payload:
    """A pickle that runs a shell command when loaded by an unrestricted unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 5])
def test_malicious_pickle_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle(folder / "test_batch", {b"data": Payload(marker), b"labels": []}, protocol)
    with pytest.raises(UnsafePickleError, match=r"refusing to load posix\.system"):
        load_dataset("cifar10", root=tmp_path, split="test")
    assert not marker.exists()
    write_pickle(tmp_path / "eval", eval, protocol)  # a bare global is refused too
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        safe_unpickle(tmp_path / "eval")


def test_wrong_cifar_contents_are_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle(folder / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
                 2)
    with pytest.raises(ValueError, match=r"uint8 array of shape \(n, 3072\)"):
        load_dataset("cifar10", root=tmp_path, split="test")
    write_pickle(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8)}, 2)
    with pytest.raises(ValueError, match=r"no 'labels' entry .*\(it has: data\)"):
        load_dataset("cifar10", root=tmp_path, split="test")


def test_a_truncated_cifar_batch_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    batch = pickle.dumps(fake_cifar_batch(2, seed=0, label_keys={"labels": 10})[0], protocol=2)
    (folder / "test_batch").parent.mkdir(parents=True)
    (folder / "test_batch").write_bytes(batch[: len(batch) // 2])  # an interrupted download
    with pytest.raises(ValueError, match=r"test_batch: not a complete pickle"):
        load_dataset("cifar10", root=tmp_path, split="test")


def test_missing_cifar_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    for i in (1, 2, 4, 5):
        write_pickle(folder / f"data_batch_{i}", fake_cifar_batch(1, i, {"labels": 10})[0], 2)
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10 python version tarball") as info:
        load_dataset("cifar10", root=tmp_path)
    assert str(folder / "data_batch_3") in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", root=tmp_path)


# ----------------------------------------------------------------------------------- real data
def test_real_digits_split():
    train, test, whole = (load_dataset("digits", split=s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(whole)) == (1437, 360, 1797)
    assert train.inputs.shape == (1437, 64) and train.inputs.dtype == torch.float32
    assert float(whole.inputs.min()) == 0.0 and float(whole.inputs.max()) == 1.0
    assert torch.equal(train.targets.bincount() + test.targets.bincount(),
                       whole.targets.bincount())
    assert test.targets.bincount().min() >= 35  # stratified: 36 ± 1 per class
    assert torch.equal(load_dataset("digits").inputs, train.inputs)  # the split is fixed
    assert load_dataset("digits", images=True).inputs.shape == (1437, 1, 8, 8)


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    train = load_dataset("fashion-mnist")
    test = load_dataset("fashion_mnist", split="test")
    assert train.inputs.shape == (60_000, 1, 28, 28) and test.inputs.shape == (10_000, 1, 28, 28)
    assert train.targets.bincount().tolist() == [6000] * 10
    assert test.targets.bincount().tolist() == [1000] * 10
    assert float(train.inputs.min()) == 0.0 and float(train.inputs.max()) == 1.0


# ------------------------------------------------------------------------------ synthetic
def test_gaussian_mixture():
    train = load_dataset("gaussian-mixture", n=30, k=3, d=20, sigma=0.0, seed=1)
    means = gaussian_mixture_means(3, 20, seed=1)
    assert torch.allclose(means.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(train.inputs, means[train.targets].float())  # σ = 0: the means exactly
    assert train.targets.bincount().tolist() == [10, 10, 10]
    noisy = load_dataset("gaussian-mixture", n=3000, k=2, d=50, sigma=0.02, seed=1)
    test = load_dataset("gaussian-mixture", split="test", n=3000, k=2, d=50,
                        sigma=0.02, seed=1)
    mu = gaussian_mixture_means(2, 50, seed=1)
    for data in (noisy, test):  # same means in both splits; noise of std σ
        residual = data.inputs.double() - mu[data.targets]
        assert abs(float(residual.std()) - 0.02) < 0.001
    assert not torch.equal(noisy.inputs, test.inputs)
    assert torch.equal(noisy.inputs, load_dataset("gaussian-mixture", n=3000, k=2, d=50,
                                                  sigma=0.02, seed=1).inputs)
    q = gaussian_mixture_means(5, 8, seed=0, orthogonal=True)
    assert torch.allclose(q @ q.T, torch.eye(5, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="6 orthogonal means do not fit in dimension 5"):
        gaussian_mixture_means(6, 5, orthogonal=True)


def test_sine_regression():
    data = load_dataset("sine", n=20_000, seed=3)
    assert data.num_classes is None and data.num_outputs == 1
    assert data.inputs.shape == data.targets.shape == (20_000, 1)
    x = data.inputs.double()
    assert float(x.min()) >= 0 and float(x.max()) < 2 * math.pi
    noise = data.targets.double() - torch.sin(x)
    assert abs(float(noise.std()) - 0.1) < 0.002 and abs(float(noise.mean())) < 0.003
    assert not torch.equal(load_dataset("sine", n=5, split="test").inputs,
                           load_dataset("sine", n=5).inputs)


# ---------------------------------------------------------------------------------- transforms
def toy(n: int = 12, classes: int = 4) -> TensorData:
    inputs = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    return TensorData(inputs, torch.arange(n) % classes, classes, "toy")


def test_subset_is_seeded_nested_and_keeps_pairs():
    data = toy()
    small, large = subset(data, 4, seed=2), subset(data, 8, seed=2)
    assert len(small) == 4
    assert torch.equal(small.inputs, large.inputs[:4])
    assert torch.equal(subset(data, 4, seed=2).inputs, small.inputs)
    assert not torch.equal(subset(data, 4, seed=3).inputs, small.inputs)
    rows = (small.inputs[:, 0] / 3).long()  # each kept input still has its own label
    assert torch.equal(small.targets, rows % 4) and len(set(rows.tolist())) == 4
    with pytest.raises(ValueError, match=r"subset size must lie in \[1, 12\] for toy, got 13"):
        subset(data, 13, seed=0)


def test_random_labels_permute_the_label_multiset():
    data = toy(40, 5)
    shuffled = random_labels(data, seed=0)
    assert torch.equal(shuffled.inputs, data.inputs)
    assert torch.equal(shuffled.targets.sort().values, data.targets.sort().values)
    assert (shuffled.targets != data.targets).sum() > 20
    assert torch.equal(random_labels(data, seed=0).targets, shuffled.targets)


def test_even_odd():
    data = even_odd(toy(10, 4))
    assert data.num_classes == 2 and data.targets.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="even_odd needs class labels"):
        even_odd(load_dataset("sine", n=4))


def test_standardize_uses_training_statistics():
    gen = torch.Generator().manual_seed(0)
    train_x = 3 + 2 * torch.randn(500, 4, generator=gen)
    train_x[:, 2] = 7.0  # a constant feature: only centred
    test_x = torch.randn(50, 4, generator=gen)
    train = TensorData(train_x, torch.zeros(500, dtype=torch.int64), 2, "a")
    test = TensorData(test_x, torch.zeros(50, dtype=torch.int64), 2, "b")
    s_train, s_test = standardize(train, test)
    assert torch.allclose(s_train.inputs.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(s_train.inputs.std(0, correction=0), torch.tensor([1.0, 1, 0, 1]),
                          atol=1e-5)
    mean, std = train_x.double().mean(0), train_x.double().std(0, correction=0)
    std[2] = 1.0
    assert torch.allclose(s_test.inputs.double(), (test_x.double() - mean) / std, atol=1e-6)
    other = TensorData(torch.zeros(2, 5), torch.zeros(2, dtype=torch.int64), 2, "c")
    with pytest.raises(ValueError, match=r"c has inputs \(5,\)"):
        standardize(train, other)


def test_standardize_refuses_an_empty_training_set():
    empty = TensorData(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), 2, "none")
    with pytest.raises(ValueError, match="none has no examples to take statistics from"):
        standardize(empty)


@pytest.mark.parametrize(("name", "option"), [("gaussian-mixture", "sigma"), ("sine", "noise")])
def test_synthetic_sets_refuse_a_nan_noise(name, option):
    with pytest.raises(ValueError, match=f"{option} non-negative"):
        load_dataset(name, n=4, **{option: float("nan")})


# -------------------------------------------------------------------------- registry, checks
def test_registry_and_argument_errors():
    assert dataset_names() == ["cifar10", "cifar100", "digits", "fashion-mnist",
                               "gaussian-mixture", "mnist", "pydoc-chars", "sine", "text"]
    assert load_dataset("Gaussian_Mixture", n=4, d=3).input_shape == (3,)
    with pytest.raises(ValueError, match="unknown data set 'svhn'; known: cifar10"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match=r"unknown option\(s\) sigma .*known: n, noise, seed"):
        load_dataset("sine", sigma=1.0)
    with pytest.raises(ValueError, match="splits train, test; got 'valid'"):
        load_dataset("mnist", split="valid")


def test_tensor_data_validation():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="3 inputs but targets of shape"):
        TensorData(x, torch.zeros(2, dtype=torch.int64), 2, "t")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), got \[0, 2\]"):
        TensorData(x, torch.tensor([0, 1, 2]), 2, "t")
    with pytest.raises(ValueError, match="class labels must be int64"):
        TensorData(x, torch.zeros(3), 2, "t")
    with pytest.raises(ValueError, match="regression targets must be floating"):
        TensorData(x, torch.zeros(3, dtype=torch.int64), None, "t")


def test_gaussian_mixture_is_the_toy_models_data_for_the_same_seed():
    """One generator: the data set's training split is the toy model's data, test shares μ."""
    from tinysubspace.problems import toy

    data = toy.make_toy_data(k=3, d=7, n=12, sigma=0.3, seed=4, orthogonal=True)
    train = load_dataset("gaussian-mixture", n=12, k=3, d=7, sigma=0.3, seed=4,
                         orthogonal_means=True)
    assert torch.equal(train.inputs, data.inputs.float())
    assert torch.equal(train.targets, data.labels)
    assert torch.equal(gaussian_mixture_means(3, 7, seed=4, orthogonal=True), data.means)
    test = load_dataset("gaussian-mixture", split="test", n=12, k=3, d=7, sigma=0.0, seed=4,
                        orthogonal_means=True)
    assert torch.equal(test.inputs, data.means[test.targets].float())
