"""Readers for the image data sets' files on disk: IDX (MNIST, Fashion-MNIST) and the CIFAR
python pickles. Nothing here downloads; a missing file raises :class:`DatasetNotFoundError`
naming every path that was looked at and how to get the data.

The CIFAR batches are pickles; they are read with :class:`RestrictedUnpickler`, which rebuilds
only numpy arrays, dtypes and plain containers, so a tampered file cannot run code.
"""

from __future__ import annotations

import _compat_pickle
import gzip
import importlib
import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DatasetNotFoundError",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "find_file",
    "read_cifar_batch",
    "read_idx",
    "safe_unpickle",
]


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not where they were looked for (the message says where and how to
    get them)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for an object that the restricted unpickler does not allow."""


# ------------------------------------------------------------------------------------ finding
def find_file(directories: Sequence[Path], names: Sequence[str]) -> Path | None:
    """The first ``directory / name`` that is a file, directories tried in order."""
    for directory in directories:
        for name in names:
            path = Path(directory) / name
            if path.is_file():
                return path
    return None


def not_found_message(what: str, directories: Sequence[Path], names: Sequence[str],
                      how_to_get: str) -> str:
    """A message listing every path looked at, then how to get the data."""
    looked = "\n".join(f"  {Path(d) / n}" for d in directories for n in names)
    return f"could not find {what}; looked at:\n{looked}\n{how_to_get}"


# ---------------------------------------------------------------------------------------- IDX
# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped if it is gzip-compressed (detected by its magic bytes)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: a damaged gzip file ({error})") from error
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed.

    Layout: a 4-byte magic number ``0x00 0x00 T D`` (``T`` the element type, ``D`` the number of
    dimensions), then ``D`` big-endian ``uint32`` sizes, then the elements, big-endian.

    Returns:
        the array, in native byte order, of the shape the header gives.

    Raises:
        ValueError: a bad magic number, an unknown type code, or a file whose length does not
            match its header.
    """
    data = _read_bytes(Path(path))
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (the magic number must start with two zero "
                         f"bytes, got {data[:4].hex() or 'an empty file'})")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x} (known: "
                         f"{', '.join(f'0x{c:02x}' for c in _IDX_TYPES)})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions "
                         f"need {header})")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: the header says shape {shape} of {dtype.name} "
                         f"({expected} bytes with the header) but the file has {len(data)} bytes")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------------------- pickles
def _numpy_attribute(modules: Sequence[str], name: str) -> Any:
    """``module.name`` from the first importable module of ``modules`` that has it."""
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise UnsafePickleError(f"numpy has no {name} in {', '.join(modules)}")


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
# (module, name) a pickle may ask for -> where to find it now (numpy 2 moved numpy.core).
_ALLOWED: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("numpy.core.multiarray", "_reconstruct"): (_MULTIARRAY, "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): (_MULTIARRAY, "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): (_NUMERIC, "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): (_NUMERIC, "_frombuffer"),
    ("numpy", "ndarray"): (("numpy",), "ndarray"),
    ("numpy", "dtype"): (("numpy",), "dtype"),
    ("_codecs", "encode"): (("_codecs",), "encode"),  # bytes in protocol-2 pickles
    **{("builtins", n): (("builtins",), n) for n in
       ("bytes", "bytearray", "list", "dict", "tuple", "set", "frozenset", "int", "float",
        "complex", "str", "bool")},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers, and nothing else.

    ``find_class`` admits only numpy's array-reconstruction helpers (``_reconstruct``,
    ``_frombuffer``, ``ndarray``, ``dtype``), ``_codecs.encode`` (how protocol-2 pickles store
    bytes) and plain builtin types; any other global raises :class:`UnsafePickleError`.
    """

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (``__builtin__``, ...) as the default find_class maps them
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        target = _ALLOWED.get((module, name))
        if target is None:
            raise UnsafePickleError(f"refusing to load {module}.{name} from a pickle: only numpy "
                                    "arrays and plain containers are allowed in a data file")
        return _numpy_attribute(*target)


def safe_unpickle(path: str | Path) -> Any:
    """Load a pickle file with :class:`RestrictedUnpickler` (``encoding='bytes'``, so Python 2
    pickles such as the CIFAR batches load).

    Raises:
        UnsafePickleError: the file asks for anything but arrays and containers.
        ValueError: the file is cut short or not a pickle (e.g. an interrupted download).
    """
    with io.BytesIO(Path(path).read_bytes()) as stream:
        try:
            return RestrictedUnpickler(stream, encoding="bytes").load()
        except UnsafePickleError as error:  # name the file: a run may read many
            raise UnsafePickleError(f"{path}: {error}") from None
        except (pickle.UnpicklingError, EOFError) as error:
            raise ValueError(f"{path}: not a complete pickle ({error})") from error


def _entry(batch: dict, key: str, path: Path) -> Any:
    for candidate in (key, key.encode()):
        if candidate in batch:
            return batch[candidate]
    keys = ", ".join(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
    raise ValueError(f"{path}: no {key!r} entry in this CIFAR batch (it has: {keys})")


def read_cifar_batch(path: str | Path, label_key: str, num_classes: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: images ``(n, 3, 32, 32)`` uint8 and labels ``(n,)`` int64.

    Args:
        path: the pickle (e.g. ``cifar-10-batches-py/data_batch_1``).
        label_key: ``"labels"`` (CIFAR-10), ``"fine_labels"`` or ``"coarse_labels"`` (CIFAR-100).
        num_classes: labels must lie in ``[0, num_classes)``.

    Raises:
        UnsafePickleError: the file asks for anything but arrays and containers.
        ValueError: not a dict, missing entries, or wrong shapes, dtype or label range.
    """
    path = Path(path)
    batch = safe_unpickle(path)
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: a CIFAR batch must be a dict, got {type(batch).__name__}")
    images = np.asarray(_entry(batch, "data", path))
    labels = np.asarray(_entry(batch, label_key, path))
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (n, 3072), got "
                         f"{images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: {images.shape[0]} images but {label_key!r} has shape "
                         f"{labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must lie in [0, {num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")
    return images.reshape(-1, 3, 32, 32), labels
