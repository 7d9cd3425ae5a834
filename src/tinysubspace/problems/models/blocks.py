"""Parameter blocks of a network, for per-block curvature: by module (``"auto"``), by layer
(``"layers"``), by type (``"types"``), or an explicit dict.

A block is a tuple of :class:`BlockPart` s — a parameter name and, optionally, a range of its
rows (``nn.MultiheadAttention`` keeps query, key and value in one ``in_proj_weight``; its rows
``[0, d)``, ``[d, 2d)``, ``[2d, 3d)`` are told apart). Parameters are named as in
``model.named_parameters()``; a tied parameter (a GPT's shared input/output embedding) appears
once, under its first name.

``"auto"``: one block per module holding parameters (weight and bias together), with a
multi-head attention's fused projection split into ``.query``, ``.key``, ``.value`` — the
granularity of Zhang et al. (2024). ``"layers"``: one block per layer of the network: the path
up to the first numeric part (``h.0``, ``layers.3``), otherwise the top-level child (``wte``,
``hidden1``). ``"types"`` (:data:`TYPES`): ``embeddings`` (token and position embeddings, and an
output layer named ``lm_head``), ``query_key`` and ``value_output`` (attention's projections),
``mlp`` (other linear layers), ``convolutions``, ``norms``, ``other``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

__all__ = ["BLOCKINGS", "TYPES", "BlockPart", "parameter_blocks"]

BLOCKINGS = ("auto", "layers", "types")
TYPES = ("embeddings", "query_key", "value_output", "mlp", "convolutions", "norms", "other")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
          *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
_QK = {"query", "key", "q", "k", "q_proj", "k_proj", "wq", "wk", "q_lin", "k_lin"}
_VO = {"value", "v", "v_proj", "wv", "v_lin", "proj", "out_proj", "o_proj", "c_proj", "wo",
       "out_lin", "o", "dense", "out"}
_OUTPUT_LAYERS = {"lm_head"}
_MHA_ROWS = {"query": (0, 1), "key": (1, 2), "value": (2, 3)}


@dataclass(frozen=True)
class BlockPart:
    """A parameter, or rows ``[start, stop)`` of its first dimension (``rows=None``: all)."""

    name: str
    rows: tuple[int, int] | None = None


Blocks = dict[str, tuple[BlockPart, ...]]


def parameter_blocks(model: nn.Module, blocks: str | Mapping[str, Iterable] = "auto",
                     trainable_only: bool = True) -> Blocks:
    """The parameter blocks of ``model`` (module docstring), in ``named_parameters()`` order.

    Args:
        model: the network.
        blocks: ``"auto"``, ``"layers"``, ``"types"``, or ``{block name: [parameter names, or
            (name, (start, stop)) row ranges]}``.
        trainable_only: leave out parameters that do not require grad (named ones are kept).

    Returns:
        ``{name: (BlockPart, …)}``; empty blocks are left out.

    Raises:
        ValueError: an unknown blocking, an unknown or repeated parameter, a block name with a
            ``/`` (it would break ``block/NAME/...`` column names), or bad rows.

    >>> model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    >>> {k: [p.name for p in v] for k, v in parameter_blocks(model, "types").items()}
    {'mlp': ['0.weight', '0.bias', '2.weight', '2.bias'], 'norms': ['1.weight', '1.bias']}
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    if isinstance(blocks, Mapping):
        return _explicit(dict(model.named_parameters()), blocks)
    if blocks not in BLOCKINGS:
        raise ValueError(f"blocks must be one of {BLOCKINGS} or a dict of parameter names, got "
                         f"{blocks!r}")
    out: dict[str, list[BlockPart]] = {}
    for name, param in named:
        for key, part in _assign(model, name, param, blocks):
            out.setdefault(key, []).append(part)
    if blocks == "types":
        out = {t: out[t] for t in TYPES if t in out}
    return {key: tuple(parts) for key, parts in out.items()}


def _assign(model: nn.Module, name: str, param, blocking: str) -> list[tuple[str, BlockPart]]:
    """``[(block, part)]`` of one parameter (two or three parts for a fused projection)."""
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    fused = isinstance(module, nn.MultiheadAttention) and leaf in ("in_proj_weight",
                                                                    "in_proj_bias")
    if fused:
        third = param.shape[0] // 3
        parts = [(role, BlockPart(name, (a * third, b * third)))
                 for role, (a, b) in _MHA_ROWS.items()]
    else:
        parts = [(None, BlockPart(name))]
    found = []
    for role, part in parts:
        if blocking == "auto":
            base = path or name
            key = f"{base}.{role}" if role else base
        elif blocking == "layers":
            key = _layer_of(name)
        else:
            key = _type_of(model, path, leaf, module, role)
        found.append((key, part))
    return found


def _layer_of(name: str) -> str:
    pieces = name.split(".")
    for i, piece in enumerate(pieces[:-1]):
        if piece.isdigit() and i > 0:
            return ".".join(pieces[: i + 1])
    return pieces[0] if len(pieces) > 1 else name


def _type_of(model: nn.Module, path: str, leaf: str, module: nn.Module, role: str | None) -> str:
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if isinstance(module, _NORMS):
        return "norms"
    if isinstance(module, nn.MultiheadAttention):
        if role is not None:
            return "query_key" if role in ("query", "key") else "value_output"
        return "query_key" if leaf[:1] in ("q", "k") or leaf == "bias_k" else "value_output"
    last = path.rpartition(".")[2].lower()
    if isinstance(module, nn.Linear):
        if last in _OUTPUT_LAYERS:
            return "embeddings"
        if _in_attention(model, path):
            return "query_key" if last in _QK else ("value_output" if last in _VO else "other")
        return "mlp"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "convolutions"
    return "other"


def _in_attention(model: nn.Module, path: str) -> bool:
    """Whether a module's parent is attention (by class or name: ``attn``, ``attention``)."""
    parent = path.rpartition(".")[0]
    module = model.get_submodule(parent) if parent else model
    label = f"{parent.rpartition('.')[2]} {type(module).__name__}".lower()
    return isinstance(module, nn.MultiheadAttention) or "attn" in label or "attention" in label


def _explicit(params: Mapping, blocks: Mapping[str, Iterable]) -> Blocks:
    out: Blocks = {}
    used: dict[str, list[tuple[int, int] | None]] = {}
    for key, items in blocks.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"block names must be non-empty strings without '/', got {key!r}")
        parts = []
        for item in [items] if isinstance(items, str) else items:
            name, rows = (item, None) if isinstance(item, str) else (item[0], tuple(item[1]))
            if name not in params:
                raise ValueError(f"block {key!r}: unknown parameter {name!r}; the model has: "
                                 f"{', '.join(params)}")
            if rows is not None and not 0 <= rows[0] < rows[1] <= params[name].shape[0]:
                raise ValueError(f"block {key!r}: rows {rows} outside [0, "
                                 f"{params[name].shape[0]}) of {name!r}")
            _check_disjoint(used, name, rows, key)
            parts.append(BlockPart(name, rows))
        if not parts:
            raise ValueError(f"block {key!r} is empty")
        out[key] = tuple(parts)
    return out


def _check_disjoint(used: dict[str, list], name: str, rows: tuple[int, int] | None,
                    key: str) -> None:
    for other in used.get(name, []):
        if rows is None or other is None or (rows[0] < other[1] and other[0] < rows[1]):
            raise ValueError(f"block {key!r}: parameter {name!r} (or its rows) is already in "
                             "another block; blocks must not overlap")
    used.setdefault(name, []).append(rows)
