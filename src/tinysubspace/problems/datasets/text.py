"""Character-level language-model data that every machine has offline: the English text CPython
ships in ``pydoc_data/topics.py`` (``pydoc-chars``), or any UTF-8 text file (``text``,
``path=FILE``).

The text is cut into a training part (the first ``1 - test_fraction``) and a test part (the
rest); the vocabulary is every character of the whole text, sorted (so both parts share it).
A part of ``n`` characters ``c_1 … c_n`` becomes ``⌊(n − 1) / T⌋`` non-overlapping sequences of
``T = context_length`` tokens: inputs ``x_i = c_{iT+1} … c_{iT+T}`` and targets shifted by one,
``y_i = c_{iT+2} … c_{iT+T+1}``. Every character after the first is thus a target exactly once,
and since every sequence holds exactly ``T`` targets, the mean over sequences of the per-sequence
mean cross-entropy *is* the mean next-token cross-entropy over all tokens of the data set (the
Hessian operator's weighting by sequences weights every token alike; for sequences of unequal
length use :class:`tinysubspace.curvature.data.Batch` with ``size`` = tokens).

For ``pydoc-chars`` the text is ``"\\n\\n".join(topics[key] for key in sorted(topics))``: 465,126
characters and 103 distinct ones with Python 3.11 (other Python versions ship other topics, so
the name of the data records the characters and the vocabulary size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tinysubspace.problems.registry import renamed_keyword

__all__ = ["TokenData", "load_pydoc_chars", "load_text", "load_text_file", "pydoc_text",
           "read_text_file", "token_sequences"]

CONTEXT_LENGTH = 64
"""Default tokens per sequence ``T``."""


@dataclass(frozen=True, eq=False)
class TokenData:
    """One split of a token data set: sequences of token ids and their next tokens.

    Attributes:
        inputs: int64 ``(n, T)`` token ids.
        targets: int64 ``(n, T)``, the next token of each position.
        num_classes: the vocabulary size ``V`` (the model's outputs per position).
        name: a short description.
        vocabulary: the characters, ``vocabulary[i]`` is token ``i``.

    Raises:
        ValueError: shapes or dtypes that do not match, or ids outside ``[0, V)``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    num_classes: int
    name: str
    vocabulary: str = ""

    def __post_init__(self) -> None:
        for what, t in (("inputs", self.inputs), ("targets", self.targets)):
            if t.dtype != torch.int64 or t.ndim != 2:
                raise ValueError(f"{self.name}: {what} must be int64 token ids (n, T), got "
                                 f"{t.dtype} of shape {tuple(t.shape)}")
            if t.numel() and not 0 <= int(t.min()) <= int(t.max()) < self.num_classes:
                raise ValueError(f"{self.name}: {what} must lie in [0, {self.num_classes})")
        if self.inputs.shape != self.targets.shape:
            raise ValueError(f"{self.name}: inputs {tuple(self.inputs.shape)} and targets "
                             f"{tuple(self.targets.shape)} differ in shape")

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, e.g. the ``data`` of a ``HessianOperator``."""
        return self.inputs, self.targets

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(T,)``."""
        return tuple(self.inputs.shape[1:])

    @property
    def num_outputs(self) -> int:
        """``V``: logits per position."""
        return self.num_classes

    @property
    def num_tokens(self) -> int:
        """Target tokens in this split, ``n T``."""
        return int(self.targets.numel())

    def decode(self, ids: torch.Tensor) -> str:
        """The characters of a 1-D tensor of token ids."""
        return "".join(self.vocabulary[int(i)] for i in ids.reshape(-1))


def pydoc_text() -> str:
    """The English text of CPython's ``pydoc_data.topics`` (joined in sorted key order)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def token_sequences(ids: torch.Tensor, context_length: int | None = None, *,
                    block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``⌊(n − 1) / T⌋`` non-overlapping sequences of ``T`` ids and their next ids (the module
    docstring); the last ``(n − 1) mod T`` ids are left out.

    Raises:
        ValueError: ``context_length < 1`` or fewer than ``context_length + 1`` ids.
        TypeError: both ``context_length`` and its old name ``block_size``.

    >>> x, y = token_sequences(torch.arange(7), 3)
    >>> x.tolist(), y.tolist()
    ([[0, 1, 2], [3, 4, 5]], [[1, 2, 3], [4, 5, 6]])
    """
    length = renamed_keyword("context_length", context_length, "block_size", block_size)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"context_length must be a positive integer, got {length!r}")
    n = (ids.numel() - 1) // length
    if n < 1:
        raise ValueError(f"{ids.numel()} tokens make no sequence of context_length {length} "
                         "(and its next token)")
    used = ids[: n * length + 1]
    return used[:-1].reshape(n, length).clone(), used[1:].reshape(n, length).clone()


def load_text(text: str, split: str, name: str, *, context_length: int | None = None,
              max_chars: int | None = None, test_fraction: float = 0.1,
              block_size: int | None = None) -> TokenData:
    """One split of a text as :class:`TokenData` (the module docstring).

    Args:
        text: the whole text.
        split: ``"train"`` or ``"test"``.
        name: the data set's name (the split, sizes and vocabulary are added).
        context_length: tokens per sequence ``T`` (default 64); ``block_size`` is its old name.
        max_chars: use only the first ``max_chars`` characters of the split (``None``: all).
        test_fraction: the share of the text, at its end, that is the test part (in ``(0, 1)``).

    Raises:
        ValueError: an unknown split, bad sizes, or too little text for one sequence.
    """
    if split not in ("train", "test"):
        raise ValueError(f"text data sets have splits train, test; got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int)
                                  or max_chars < 2):
        raise ValueError(f"max_chars must be an integer of at least 2, got {max_chars!r}")
    vocabulary = "".join(sorted(set(text)))
    cut = len(text) - round(test_fraction * len(text))
    part = text[:cut] if split == "train" else text[cut:]
    part = part[:max_chars] if max_chars is not None else part
    index = {char: i for i, char in enumerate(vocabulary)}
    ids = torch.tensor([index[char] for char in part], dtype=torch.int64)
    length = renamed_keyword("context_length", context_length, "block_size", block_size)
    length = CONTEXT_LENGTH if length is None else length
    inputs, targets = token_sequences(ids, length)
    label = (f"{name}-{split}[{inputs.shape[0]}x{length} tokens of {len(text)} chars, "
             f"V={len(vocabulary)}]")
    return TokenData(inputs, targets, len(vocabulary), label, vocabulary)


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of ``path``.

    Raises:
        FileNotFoundError: no such file (the path is named).
        ValueError: the file is empty or not UTF-8.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text data: no file {str(path)!r}; pass data.path=FILE (any "
                                "UTF-8 text file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"text data: {path} is not UTF-8 text ({error})") from None
    if not text:
        raise ValueError(f"text data: {path} is empty")
    return text


def load_pydoc_chars(root: Path | None, split: str, *, context_length: int | None = None,
                     max_chars: int | None = None, test_fraction: float = 0.1,
                     block_size: int | None = None) -> TokenData:
    """``pydoc-chars`` of the data-set catalogue: :func:`pydoc_text` by :func:`load_text`
    (``root`` is not used)."""
    return load_text(pydoc_text(), split, "pydoc-chars", context_length=context_length,
                     max_chars=max_chars, test_fraction=test_fraction, block_size=block_size)


def load_text_file(root: Path | None, split: str, *, path: str | None = None,
                   context_length: int | None = None, max_chars: int | None = None,
                   test_fraction: float = 0.1, block_size: int | None = None) -> TokenData:
    """``text`` of the data-set catalogue: the characters of the file ``path`` (relative paths
    are taken in ``root`` when given).

    Raises:
        ValueError: no ``path``.
        FileNotFoundError: the file does not exist.
    """
    if path is None:
        raise ValueError("the text data set needs path=FILE (data.path in a config)")
    file = Path(path).expanduser()
    if root is not None and not file.is_absolute():
        file = Path(root) / file
    return load_text(read_text_file(file), split, f"text:{file.name}",
                     context_length=context_length, max_chars=max_chars,
                     test_fraction=test_fraction, block_size=block_size)
