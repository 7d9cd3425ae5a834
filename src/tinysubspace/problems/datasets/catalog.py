"""The paper's data sets by name, in memory (the container :class:`TensorData` and the label
transforms of Table 1 and Appendix B live in :mod:`tinysubspace.problems.datasets.tensors`;
re-exported here).

``load_dataset(name, root=..., split=...)`` returns a :class:`TensorData`: all inputs and targets
of one split as two tensors. Nothing is downloaded: the image data sets are read from files
already on disk, and a missing file raises :class:`DatasetNotFoundError` (a
``FileNotFoundError``) that lists every path looked at and says how to get the data.

========================  ==========================================================================
name                      what
========================  ==========================================================================
``digits``                scikit-learn's 8×8 digits (1,797 images, 64 features in [0, 1]); a fixed
                          stratified split (seed 0): 1,437 ``train``, 360 ``test``; ``split="all"``
``mnist``                 IDX files; images ``(n, 1, 28, 28)`` in [0, 1]; 60,000 train, 10,000 test
``fashion-mnist``         the same format; by default from /usr/share/datasets/fashion-mnist
``cifar10``               ``cifar-10-batches-py``; images ``(n, 3, 32, 32)``; 50,000 / 10,000
``cifar100``              ``cifar-100-python``; 100 fine (or 20 coarse) labels; 50,000 / 10,000
``gaussian-mixture``      ``k`` classes at random unit means in R^``d`` plus N(0, σ²) noise (Sec. 3)
``sine``                  regression: x ~ U[0, 2π), y = sin x + N(0, 0.1²) (Table 1, last row)
``pydoc-chars``           characters of CPython's ``pydoc_data/topics.py`` (465,126 on Python 3.11):
                          sequences of ``context_length`` token ids and their next tokens
``text``                  the same from any UTF-8 file ``path`` (:mod:`.text`)
========================  ==========================================================================

Where files are looked for: in ``root`` (and its torchvision layout, e.g. ``root/MNIST/raw``)
when given; otherwise under ``$TINYSUBSPACE_DATA`` (if set) and then ``/usr/share/datasets``, in
a folder named after the data set (``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``) or in
the torchvision layout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinysubspace.problems.datasets.files import (
    DatasetNotFoundError,
    find_file,
    not_found_message,
    read_cifar_batch,
    read_idx,
)
from tinysubspace.problems.datasets.mixture import gaussian_mixture_means, sample_gaussian_mixture
from tinysubspace.problems.datasets.tensors import (
    TensorData,
    even_odd,
    random_labels,
    standardize,
    subset,
)
from tinysubspace.problems.datasets.text import load_pydoc_chars, load_text_file
from tinysubspace.problems.registry import check_options, lookup

__all__ = [
    "DATA_ENV",
    "DatasetNotFoundError",
    "TensorData",
    "dataset_names",
    "even_odd",
    "gaussian_mixture_means",
    "load_dataset",
    "random_labels",
    "standardize",
    "subset",
]

DATA_ENV = "TINYSUBSPACE_DATA"
SYSTEM_DATA = Path("/usr/share/datasets")


# ------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class _Spec:
    loader: Callable[..., TensorData]
    splits: tuple[str, ...] = ("train", "test")


def dataset_names() -> list[str]:
    """The names ``load_dataset`` knows."""
    return sorted(_REGISTRY)


def load_dataset(name: str, *, root: str | os.PathLike | None = None, split: str = "train",
                 **options: object) -> TensorData:
    """Load one split of a data set by name (see the module docstring for the list).

    Args:
        name: a name from :func:`dataset_names` (case and ``_``/``-`` do not matter).
        root: the folder holding the files (image data sets only); ``None``: the default places.
        split: ``"train"`` or ``"test"`` (``digits`` also ``"all"``).
        **options: the data set's own options, e.g. ``fallback_to_test=True`` (MNIST formats),
            ``labels="coarse"`` (CIFAR-100), ``n``, ``seed``, ``sigma`` (synthetic sets).

    Raises:
        ValueError: an unknown name, split or option (the known ones are listed).
        DatasetNotFoundError: the files are missing.
    """
    key, spec = lookup(_REGISTRY, name, "data set")
    if split not in spec.splits:
        raise ValueError(f"data set {key!r} has splits {', '.join(spec.splits)}; got {split!r}")
    check_options(options, spec.loader, f"data set {key!r}")
    return spec.loader(None if root is None else Path(root), split, **options)


def _search_dirs(root: Path | None, folders: Sequence[str]) -> list[Path]:
    """Where to look: ``root`` and ``root/<folder>``; or, without a root, the default places."""
    if root is not None:
        return [root, *(root / f for f in folders)]
    bases = [Path(os.environ[DATA_ENV])] if os.environ.get(DATA_ENV) else []
    return [base / f for base in [*bases, SYSTEM_DATA] for f in folders]


def _first_dir_with(dirs: Sequence[Path], names: Sequence[Sequence[str]]) -> list[Path] | None:
    """In the first folder holding one of each group of names, the files found."""
    for directory in dirs:
        found = [find_file([directory], group) for group in names]
        if all(path is not None for path in found):
            return [path for path in found if path is not None]
    return None


# -------------------------------------------------------------------------------------- digits
def _load_digits(root: Path | None, split: str, *, seed: int = 0, test_size: int = 360,
                 images: bool = False) -> TensorData:
    """scikit-learn's digits, pixels / 16; a stratified split by ``seed`` (``test_size`` test
    images); ``images=True`` gives ``(n, 1, 8, 8)`` instead of ``(n, 64)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    if split != "all":
        parts = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
        x, y = (parts[0], parts[2]) if split == "train" else (parts[1], parts[3])
    inputs = torch.from_numpy(np.ascontiguousarray(x))
    if images:
        inputs = inputs.reshape(-1, 1, 8, 8)
    return TensorData(inputs, torch.from_numpy(np.ascontiguousarray(y)), 10, f"digits-{split}")


# --------------------------------------------------------------------------------- MNIST (IDX)
def _idx_names(prefix: str, kind: str) -> list[str]:
    dims = 3 if kind == "images" else 1
    base = [f"{prefix}-{kind}-idx{dims}-ubyte", f"{prefix}-{kind}.idx{dims}-ubyte"]
    return [name + ext for name in base for ext in ("", ".gz")]


_IDX_SETS = {
    "mnist": ("MNIST", ["MNIST/raw", "mnist"],
              "Download the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"
              " t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from the MNIST site "
              "(http://yann.lecun.com/exdb/mnist/ or a mirror) into a folder DIR and pass root=DIR "
              f"(or put them in ${DATA_ENV}/mnist)."),
    "fashion-mnist": ("Fashion-MNIST", ["FashionMNIST/raw", "fashion-mnist"],
                      "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu: "
                      "/usr/share/datasets/fashion-mnist), or download the four IDX files from "
                      "https://github.com/zalandoresearch/fashion-mnist into a folder DIR and "
                      "pass root=DIR."),
}


def _load_idx_set(key: str, root: Path | None, split: str, fallback_to_test: bool) -> TensorData:
    title, folders, how = _IDX_SETS[key]
    dirs = _search_dirs(root, folders)
    prefix = "train" if split == "train" else "t10k"
    found = _first_dir_with(dirs, [_idx_names(prefix, "images"), _idx_names(prefix, "labels")])
    name = f"{key}-{split}"
    if found is None and split == "train" and fallback_to_test:
        found = _first_dir_with(dirs, [_idx_names("t10k", "images"), _idx_names("t10k", "labels")])
        name = f"{key}-test(as train)"
    if found is None:
        hint = "" if split != "train" or fallback_to_test else (
            "\nTo use the 10,000 test images instead, pass fallback_to_test=True.")
        names = _idx_names(prefix, "images") + _idx_names(prefix, "labels")
        raise DatasetNotFoundError(not_found_message(
            f"the {title} {split} files", dirs, names, how) + hint)
    images, labels = (read_idx(path) for path in found)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{found[0]}: expected uint8 images (n, rows, cols), got {images.dtype} "
                         f"{images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{found[1]}: {images.shape[0]} images in {found[0].name} but labels of "
                         f"shape {labels.shape}")
    inputs = torch.from_numpy(images).unsqueeze(1).to(torch.float32) / 255.0
    return TensorData(inputs, torch.from_numpy(labels.astype(np.int64)), 10, name)


def _load_mnist(root: Path | None, split: str, *, fallback_to_test: bool = False) -> TensorData:
    """MNIST from IDX files (``fallback_to_test``: use the test files if the training ones are
    missing, only when asked)."""
    return _load_idx_set("mnist", root, split, fallback_to_test)


def _load_fashion_mnist(root: Path | None, split: str, *, fallback_to_test: bool = False
                        ) -> TensorData:
    """Fashion-MNIST from IDX files (same options as MNIST)."""
    return _load_idx_set("fashion-mnist", root, split, fallback_to_test)


# --------------------------------------------------------------------------------------- CIFAR
def _load_cifar(root: Path | None, split: str, *, folder: str, files: list[str], label_key: str,
                num_classes: int, name: str, how: str) -> TensorData:
    dirs = _search_dirs(root, [folder, f"{name.split('-')[0]}/{folder}",
                               name.split("-")[0]])
    found = _first_dir_with(dirs, [[f] for f in files])
    if found is None:
        raise DatasetNotFoundError(not_found_message(
            f"the {name} {split} batches ({', '.join(files)})", dirs, files, how))
    parts = [read_cifar_batch(path, label_key, num_classes) for path in found]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    inputs = torch.from_numpy(images).to(torch.float32) / 255.0
    return TensorData(inputs, torch.from_numpy(labels), num_classes, f"{name}-{split}")


def _load_cifar10(root: Path | None, split: str) -> TensorData:
    """CIFAR-10 from the python version (``cifar-10-batches-py``)."""
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return _load_cifar(root, split, folder="cifar-10-batches-py", files=files,
                       label_key="labels", num_classes=10, name="cifar10",
                       how="Get the CIFAR-10 python version tarball (cifar-10-python.tar.gz from "
                           "https://www.cs.toronto.edu/~kriz/cifar.html), extract it in a folder "
                           "DIR (giving DIR/cifar-10-batches-py) and pass root=DIR.")


def _load_cifar100(root: Path | None, split: str, *, labels: str = "fine") -> TensorData:
    """CIFAR-100 from the python version; ``labels="fine"`` (100 classes) or ``"coarse"`` (20)."""
    if labels not in ("fine", "coarse"):
        raise ValueError(f"labels must be 'fine' or 'coarse', got {labels!r}")
    return _load_cifar(root, split, folder="cifar-100-python", files=[split],
                       label_key=f"{labels}_labels", num_classes=100 if labels == "fine" else 20,
                       name="cifar100" if labels == "fine" else "cifar100-coarse",
                       how="Get the CIFAR-100 python version tarball (cifar-100-python.tar.gz "
                           "from https://www.cs.toronto.edu/~kriz/cifar.html), extract it in a "
                           "folder DIR (giving DIR/cifar-100-python) and pass root=DIR.")


# ----------------------------------------------------------------------------------- synthetic
_SPLIT_STREAM = {"train": 1, "test": 2}


def _load_gaussian_mixture(root: Path | None, split: str, *, n: int = 1000, k: int = 2,
                           d: int = 1000, sigma: float = 0.0, seed: int = 0,
                           orthogonal_means: bool = False) -> TensorData:
    """``k`` classes in R^``d``: ``x = μ_y + σ ε``, ε ~ N(0, I_d); classes balanced (``n // k``
    or one more each, labels ``a mod k``). The means depend on ``seed`` only, so the train and
    test splits of one seed share them (and differ in their samples); the train split is the toy
    model's data for the same seed (:mod:`tinysubspace.problems.datasets.mixture`)."""
    x, labels, _ = sample_gaussian_mixture(k, d, n, sigma, seed, orthogonal_means, split)
    return TensorData(x.float(), labels, k,
                      f"gaussian-mixture-k{k}-d{d}-{split}")


def _load_sine(root: Path | None, split: str, *, n: int = 1000, noise: float = 0.1,
               seed: int = 0) -> TensorData:
    """One period of a sine: ``x ~ U[0, 2π)``, ``y = sin x + noise · ε``; inputs and targets
    ``(n, 1)``."""
    if n < 1 or not noise >= 0:
        raise ValueError(f"n must be positive and noise non-negative, got n={n}, noise={noise}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    x = rng.uniform(0.0, 2 * math.pi, size=(n, 1))
    y = np.sin(x) + noise * rng.standard_normal((n, 1))
    return TensorData(torch.from_numpy(x.astype(np.float32)),
                      torch.from_numpy(y.astype(np.float32)), None, f"sine-{split}")


_REGISTRY: dict[str, _Spec] = {
    "digits": _Spec(_load_digits, ("train", "test", "all")),
    "mnist": _Spec(_load_mnist),
    "fashion-mnist": _Spec(_load_fashion_mnist),
    "cifar10": _Spec(_load_cifar10),
    "cifar100": _Spec(_load_cifar100),
    "gaussian-mixture": _Spec(_load_gaussian_mixture),
    "sine": _Spec(_load_sine),
    "pydoc-chars": _Spec(load_pydoc_chars),
    "text": _Spec(load_text_file),
}
