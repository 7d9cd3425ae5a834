"""Data sets by name (``catalog``): standard files read from a folder (``files``: MNIST IDX,
CIFAR pickles), in-memory tensors and label transforms (``tensors``), synthetic sets."""

from tinysubspace.problems.datasets.catalog import (
    DATA_ENV,
    DatasetNotFoundError,
    dataset_names,
    gaussian_mixture_means,
    load_dataset,
)
from tinysubspace.problems.datasets.tensors import (
    TensorData,
    even_odd,
    random_labels,
    standardize,
    subset,
)

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
