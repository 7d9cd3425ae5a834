"""The ways to compute ``∇²ℓ_j V`` for one batch: small strategy objects, one per method.

Each strategy is called as ``strategy(op, batch, index, block)`` with a
:class:`~tinysubspace.curvature.dataset_operator.DataSetOperator` and returns the ``(p, b)``
block ``∇²ℓ_j V``. It sees only the operator's public interface: the measured parameter copies
``op.leaves`` (the point ``θ``), their ``op.layout``, the batch loss ``op.batch_loss(batch,
index)`` (with a graph in grad mode) and ``op.functional_loss(batch)`` (for ``torch.func``).

``loop``: double backprop, the gradient graph built once per batch and one backward pass per
column (``retain_graph``). ``batched``: the same graph, one vmapped backward for the block
(``is_grads_batched``). ``jvp``: forward-over-reverse ``jvp(grad ℓ)`` vmapped over the columns
(``torch.func``; not in ``mode="train"`` with batch norm). ``auto``: ``jvp`` on a GPU in eval
mode (1.5× faster single products and 2.6× faster blocks than ``loop`` for ResNet-18 on an
H200), ``loop`` otherwise (on a CPU ``loop`` is as fast as any for blocks and the fastest for
single products). Timings: docs/performance.md. In torch 2.13 ``jvp(grad ℓ)`` raises
"ZeroTensors are immutable" for ``nn.MSELoss`` / ``F.mse_loss``; ``auto`` then falls back to
``loop`` for the rest of the operator's life (:class:`FallbackOnError`), so ``auto`` always
works; an explicit ``jvp`` still raises.

``finite_difference`` / ``finite_difference4``: central differences of ordinary gradients along
each column, 2 or 4 points (:class:`FiniteDifference`; no double backward, so they run through
``@once_differentiable`` kernels); the product is a :class:`ProductEstimate` carrying its error
estimate, and :meth:`FiniteDifference.error_floor` is the a-priori relative error. The exact
double-backward methods name them when a kernel cannot be differentiated twice.

**Graph retention.** The double-backward strategies also take a prebuilt
:class:`~tinysubspace.curvature.graphs.GradientGraph` (:meth:`DoubleBackward.through`); the
Hessian operator keeps one per chunk while they fit a memory budget
(:mod:`tinysubspace.curvature.graphs`). ``jvp`` has no graph that outlives a call
(``torch.func`` transforms trace anew each time), so it always rebuilds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tinysubspace.curvature.graphs import (
    DEFAULT_GRAPH_MEMORY,
    GradientGraph,
    build_gradient_graph,
    free_memory,
    graph_budget,
    graph_nbytes,
    validate_graph_memory,
)

__all__ = [
    "DEFAULT_GRAPH_MEMORY",
    "FINITE_DIFFERENCE_METHODS",
    "HALF_PRECISION_FLOOR",
    "HALF_PRECISION_STEP",
    "HVP_METHODS",
    "KNOWN_METHODS",
    "FallbackOnError",
    "FiniteDifference",
    "GradientGraph",
    "HvpStrategy",
    "ProductEstimate",
    "accumulation_dtype",
    "build_gradient_graph",
    "check_functional_mode",
    "free_memory",
    "graph_budget",
    "graph_nbytes",
    "hvp_strategy",
    "resolve_hvp_method",
    "validate_graph_memory",
]

HVP_METHODS = ("auto", "loop", "batched", "jvp")
"""Exact ways to compute ``∇²ℓ V`` (``op.hvp_method``); see the module docstring."""

FINITE_DIFFERENCE_METHODS = ("finite_difference", "finite_difference4")
"""Approximate ways: differences of ordinary gradients (2 or 4 points, :class:`FiniteDifference`),
for kernels without double backward; each product carries its error estimate."""

KNOWN_METHODS = HVP_METHODS + FINITE_DIFFERENCE_METHODS
"""Every name ``hvp_method`` accepts."""

HALF_PRECISION_STEP = {torch.bfloat16: 1e-3, torch.float16: 5e-4}
"""``κ`` of the finite-difference step ``h = κ max(‖θ‖, 1) / ‖v‖`` for a model measured in its
own half precision (:class:`FiniteDifference`, "Half precision"; measured, docs/scale.md)."""

HALF_PRECISION_FLOOR = {torch.bfloat16: 0.1, torch.float16: 0.1}
"""A-priori relative error of a half-precision finite-difference product (measured)."""


class HvpStrategy(Protocol):
    def __call__(self, op: Any, batch: Any, index: int,
                 block: torch.Tensor) -> torch.Tensor | ProductEstimate: ...


@dataclass(frozen=True)
class ProductEstimate:
    """An approximate batch product and a bound on its error, per column.

    Attributes:
        value: the ``(p, b)`` product.
        error: ``(b,)`` estimated absolute error of each column (2-norm).
    """

    value: torch.Tensor
    error: torch.Tensor


class DoubleBackward:
    """``∇(∇ℓ · v)`` through one gradient graph per batch: a backward per column (``batched``
    false) or one vmapped backward for the whole block (``batched`` true, ``b > 1``)."""

    uses_graph = True

    def __init__(self, batched: bool) -> None:
        self.batched = batched

    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> torch.Tensor:
        return self.through(build_gradient_graph(op, batch, index), op, block, keep=False)

    def through(self, graph: GradientGraph, op: Any, block: torch.Tensor,
                keep: bool) -> torch.Tensor:
        """``∇²ℓ_j V`` by backward passes through ``graph``; ``keep``: leave the graph usable
        for later products (``retain_graph=True`` on every pass).

        Raises:
            RuntimeError: a kernel on the graph is differentiable only once (a custom
                ``autograd.Function`` marked ``@once_differentiable``); the message names
                ``hvp_method="finite_difference"``, which needs ordinary gradients only.
        """
        if graph.once_only:
            raise RuntimeError(
                f"hvp_method={'batched' if self.batched else 'loop'!r} needs double backward, "
                f"but {', '.join(graph.once_only)} on the model's graph is differentiable only "
                "once (@once_differentiable; torch would silently drop its second derivative); "
                "use hvp_method='finite_difference' (or 'finite_difference4'), which needs "
                "ordinary gradients only")
        return self._through(graph, op, block, keep)

    def _through(self, graph: GradientGraph, op: Any, block: torch.Tensor,
                 keep: bool) -> torch.Tensor:
        out = torch.zeros_like(block)
        if not graph.live:  # the loss is at most linear in every parameter: zero curvature
            return out
        b, leaves, grads = block.shape[1], op.leaves, graph.grads
        slices, shapes = op.layout.slices(), op.layout.shapes
        with torch.enable_grad():
            if self.batched and b > 1:  # one vmapped backward for the whole block
                directions = [block[slices[i]].T.reshape(b, *shapes[i]) for i in graph.live]
                hv = torch.autograd.grad([grads[i] for i in graph.live], leaves,
                                         grad_outputs=directions, is_grads_batched=True,
                                         retain_graph=keep, allow_unused=True)
                for part, h in zip(slices, hv, strict=True):
                    if h is not None:
                        out[part] = h.reshape(b, -1).T
                return out
            for column in range(b):  # one backward per column through the retained graph
                directions = [block[slices[i], column].view(shapes[i]) for i in graph.live]
                hv = torch.autograd.grad([grads[i] for i in graph.live], leaves,
                                         grad_outputs=directions,
                                         retain_graph=keep or column < b - 1,
                                         allow_unused=True)
                for part, h in zip(slices, hv, strict=True):
                    if h is not None:
                        out[part, column] = h.reshape(-1)
        return out


class ForwardOverReverse:
    """``jvp(grad ℓ_j)`` (``torch.func``), vmapped over the block's columns. Nothing outlives a
    call, so there is no graph to retain (``uses_graph`` false)."""

    uses_graph = False

    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> torch.Tensor:
        b = block.shape[1]
        primals = tuple(leaf.detach() for leaf in op.leaves)
        grad_fn = torch.func.grad(op.functional_loss(batch), argnums=tuple(range(len(primals))))
        tangents = tuple(block[part].T.reshape(b, *shape)
                         for part, shape in zip(op.layout.slices(), op.layout.shapes,
                                                strict=True))
        hv = torch.func.vmap(lambda *t: torch.func.jvp(grad_fn, primals, t)[1])(*tangents)
        return torch.cat([h.reshape(b, -1) for h in hv], 1).T


class FiniteDifference:
    """``∇²ℓ_j v`` from differences of ordinary gradients along ``v``: no double backward.

    With :math:`g(t) = \\nabla \\ell_j(\\theta + t v)`, the central difference and its
    Richardson extrapolation (``points=4``, ``hvp_method="finite_difference4"``) are

    .. math::  D_2(h) = \\frac{g(h) - g(-h)}{2h} = \\nabla^2 \\ell_j v
               + \\frac{h^2}{6} \\nabla^4 \\ell_j[v, v, v] + O(h^4),
               \\qquad D_4(h) = \\frac{4 D_2(h) - D_2(2h)}{3} = \\nabla^2 \\ell_j v + O(h^4).

    **Step.** Each gradient carries a rounding error of about :math:`\\epsilon \\lVert g
    \\rVert` (:math:`\\epsilon` the dtype's machine epsilon), so the error of :math:`D_2` is
    about :math:`\\tfrac{h^2}{6} \\lVert \\nabla^4 \\ell[v,v,v] \\rVert
    + \\epsilon \\lVert g \\rVert / h`. If the loss varies on the scale of ``θ``
    (:math:`\\lVert \\nabla^4 \\ell[v,v,v] \\rVert \\sim \\lVert g \\rVert
    \\lVert v \\rVert^3 / s^3`, :math:`s = \\max(\\lVert\\theta\\rVert, 1)`) the two
    terms balance at

    .. math::  h = \\epsilon^{1/3}\\, \\max(\\lVert\\theta\\rVert, 1) / \\lVert v\\rVert

    (the classic per-coordinate rule :math:`h_i = \\epsilon^{1/3} |\\theta_i|` for the whole
    vector), each column its own ``h``, where both are of relative order
    :math:`\\epsilon^{2/3}` (4e-11 in float64, 2e-5 in float32): :meth:`error_floor`.
    :math:`D_4` uses the same ``h``: its truncation :math:`O(h^4)` is then negligible and it is
    limited by rounding (the step :math:`\\epsilon^{1/5} s` that would balance a smooth loss is
    100× longer and crosses the kinks of a ReLU network: measured relative error 0.9 on the
    test CNN, against 3e-11 at ``h``).

    **Half precision** (``bfloat16``, ``float16``: a model measured in its own dtype, no float32
    copy). Three errors meet, measured on the project's ``gpt`` (docs/scale.md, "Low
    precision"): the gradient's own rounding through the whole forward and backward (5e-3 of
    ``‖g‖`` in bf16), the rounding of the point ``θ ± h v`` to bf16 (a shift below half an ulp
    of ``θ_i``, ``2^{-9} |θ_i|``, is lost), and the truncation, which along a top eigenvector of a
    transformer is 100× that of the "scale of ``θ``" model (the loss bends on a scale of
    ``‖θ‖/200``: embeddings and biases that feed the residual stream). ``eps^{1/3} = 0.2``
    gave a relative product error of 0.98 there; the error against ``κ = h ‖v‖ / max(‖θ‖, 1)`` was
    smallest at ``κ = 1e-3`` (0.07 along the top eigenvector, 0.3 along a random vector, untrained
    ``gpt``), so :data:`HALF_PRECISION_STEP` is ``1e-3`` for bf16 (``float16``: ``5e-4``, the
    same balance scaled by ``eps^{1/3}``, not measured) and :data:`HALF_PRECISION_FLOOR` 0.1.
    The point is formed in float32 and rounded once (never a float32 copy of the model: one
    parameter at a time), the two gradients are differenced and divided in float32, and the
    data-set operator sums the batches in float32 (:func:`accumulation_dtype`). After 300 Adam
    steps (λ1 = 128) the same ``gpt``'s bf16 products were wrong by 0.5: measure trained models
    with ``dtype=torch.float32`` (a copy). ReLU networks with many units: a difference crosses
    kinks and its error does not shrink with ``h`` (a factor 127 for 512 examples × 200 units).

    **Error estimate** (absolute, per column, carried by the :class:`ProductEstimate`):
    :math:`D_2`: the rounding term :math:`\\epsilon (\\lVert g(h)\\rVert +
    \\lVert g(-h)\\rVert) / 2h` doubled (the model's balance; the real truncation constant
    needs two more gradients and was up to 50× larger on the test networks);
    :math:`D_4`: :math:`\\lVert D_4 - D_2(h)\\rVert` (the measured error of the 2-point form,
    a bound on the 4-point one) plus its rounding term.

    Costs 2 (``points=2``) or 4 forward and backward passes per column and batch, and the memory
    of one ordinary gradient: it runs through kernels that are differentiable only once
    (``@once_differentiable``, fused or sharded layers) where double backward cannot. Train-mode
    dropout draws new masks for each gradient and ruins the difference
    (:meth:`~tinysubspace.curvature.dataset_operator.DataSetOperator.check_deterministic`
    catches it).
    """

    uses_graph = False

    def __init__(self, points: int = 2) -> None:
        if points not in (2, 4):
            raise ValueError(f"finite differences use 2 or 4 points, got {points}")
        self.points = points

    def error_floor(self, dtype: torch.dtype) -> float:
        """A-priori relative error of one product: ``eps^(2/3)`` (class docstring); for
        ``float16`` / ``bfloat16`` the measured :data:`HALF_PRECISION_FLOOR`."""
        if dtype in HALF_PRECISION_STEP:
            return HALF_PRECISION_FLOOR[dtype]
        return torch.finfo(dtype).eps ** (2 / 3)

    def step(self, theta_norm: float, v_norm: float, dtype: torch.dtype) -> float:
        """``h = κ max(‖θ‖, 1) / ‖v‖`` with ``κ = eps^(1/3)`` (class docstring), or the
        measured :data:`HALF_PRECISION_STEP` ``κ`` for ``float16`` / ``bfloat16``."""
        kappa = HALF_PRECISION_STEP.get(dtype, torch.finfo(dtype).eps ** (1 / 3))
        return kappa * max(theta_norm, 1.0) / v_norm

    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> ProductEstimate:
        work = accumulation_dtype(block.dtype)  # float32 for a half-precision model
        out = torch.zeros(block.shape, dtype=work, device=block.device)
        error = out.new_zeros(block.shape[1])
        eps = torch.finfo(block.dtype).eps
        theta_norm = float(torch.cat([leaf.detach().reshape(-1).to(work)
                                      for leaf in op.leaves]).norm())
        for column in range(block.shape[1]):
            v = block[:, column].to(work)
            v_norm = float(v.norm())
            if v_norm == 0.0:
                continue
            h = self.step(theta_norm, v_norm, block.dtype)
            g1, m1 = _gradient_at(op, batch, index, v, h), _gradient_at(op, batch, index, v, -h)
            d2 = (g1 - m1) / (2 * h)
            rounding = eps * (g1.norm() + m1.norm()) / (2 * h)
            if self.points == 2:
                out[:, column], error[column] = d2, 2 * rounding
                continue
            g2, m2 = (_gradient_at(op, batch, index, v, 2 * h),
                      _gradient_at(op, batch, index, v, -2 * h))
            d4 = (8 * (g1 - m1) - (g2 - m2)) / (12 * h)
            rounding4 = eps * (8 * (g1.norm() + m1.norm()) + g2.norm() + m2.norm()) / (12 * h)
            out[:, column], error[column] = d4, (d4 - d2).norm() + rounding4
        return ProductEstimate(out, error)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and differences of a ``dtype`` measurement are formed in: ``float32``
    for ``float16`` / ``bfloat16`` (a model measured in its own half precision), else ``dtype``.

    >>> accumulation_dtype(torch.bfloat16), accumulation_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _gradient_at(op: Any, batch: Any, index: int, v: torch.Tensor, t: float) -> torch.Tensor:
    """``∇ℓ_j(θ + t v)``, flat in ``v``'s dtype, by one ordinary forward and backward pass.

    The point is formed in ``v``'s dtype and rounded once to the model's (``θ + t v`` in
    float32, then bfloat16 for a bf16 model): one parameter at a time, so the float32 shadow
    costs the largest parameter's size in float32, never a copy of the model."""
    pieces = op.layout.split(v)
    leaves = [(leaf.detach().to(v.dtype) + t * piece).to(leaf.dtype).requires_grad_(True)
              for leaf, piece in zip(op.leaves, pieces.values(), strict=True)]
    with torch.enable_grad():
        loss = op.batch_loss(batch, index, leaves=leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return op.layout.flatten([None if g is None else g.to(v.dtype) for g in grads], like=v)


class FallbackOnError:
    """``primary``, until a product hits a known torch failure of it; then ``fallback`` for the
    rest of this object's life (one object per operator). Used by ``auto`` where it picks
    ``jvp``: torch 2.13's ``jvp(grad ℓ)`` raises "ZeroTensors are immutable" for a
    mean-squared-error loss, and double backprop (``loop``) computes the same product.

    Attributes:
        current: the strategy now in use.
        failure: the message of the error that caused the fallback (``None`` before).
    """

    def __init__(self, primary: Any, fallback: Any,
                 known: tuple[str, ...] = ("ZeroTensors are immutable",)) -> None:
        self.primary, self.fallback, self.known = primary, fallback, known
        self.current, self.failure = primary, None

    @property
    def uses_graph(self) -> bool:
        return bool(getattr(self.current, "uses_graph", False))

    def __call__(self, op: Any, batch: Any, index: int, block: torch.Tensor) -> torch.Tensor:
        if self.current is self.primary:
            try:
                return self.primary(op, batch, index, block)
            except RuntimeError as error:
                if not any(text in str(error) for text in self.known):
                    raise
                self.current, self.failure = self.fallback, str(error)
        return self.current(op, batch, index, block)

    def through(self, graph: GradientGraph, op: Any, block: torch.Tensor,
                keep: bool) -> torch.Tensor:
        """As the current strategy's ``through`` (only while it :attr:`uses_graph`)."""
        return self.current.through(graph, op, block, keep)


_STRATEGIES: dict[str, HvpStrategy] = {
    "loop": DoubleBackward(batched=False),
    "batched": DoubleBackward(batched=True),
    "jvp": ForwardOverReverse(),
    "finite_difference": FiniteDifference(points=2),
    "finite_difference4": FiniteDifference(points=4),
}


def auto_choice(device: torch.device, mode: str) -> str:
    """What ``auto`` picks first: ``jvp`` on a GPU in eval mode, else ``loop``."""
    return "jvp" if torch.device(device).type == "cuda" and mode == "eval" else "loop"


def resolve_hvp_method(name: str, device: torch.device, mode: str) -> str:
    """The method ``name`` stands for (``auto`` resolved for ``device`` and ``mode`` by
    :func:`auto_choice`; a fallback after a failure is :class:`FallbackOnError`'s).

    Raises:
        ValueError: an unknown name (the known ones are listed).
    """
    if name not in KNOWN_METHODS:
        raise ValueError(f"hvp_method must be one of {KNOWN_METHODS}, got {name!r}")
    return auto_choice(device, mode) if name == "auto" else name


def check_functional_mode(model: torch.nn.Module, name: str, mode: str) -> None:
    """``jvp`` (``torch.func``) cannot run a train-mode batch norm that updates its running
    statistics (an in-place write) or dropout (random numbers inside ``vmap``).

    Raises:
        ValueError: ``name="jvp"`` with ``mode="train"`` and such modules (they are named).
    """
    if name != "jvp" or mode != "train":
        return
    found = sorted({type(m).__name__ for m in model.modules()
                    if (isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                        and m.track_running_stats)
                    or (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0)})
    if found:
        raise ValueError(f"hvp_method='jvp' cannot run mode='train' with {', '.join(found)}: "
                         "torch.func transforms forbid batch norm's in-place running-statistics "
                         "update and dropout's random numbers; use hvp_method='loop' (or "
                         "'auto'), or mode='eval'")


def hvp_strategy(name: str, device: torch.device, mode: str) -> HvpStrategy:
    """The strategy object for ``name`` (see :func:`resolve_hvp_method`); ``auto`` resolving to
    ``jvp`` gives a new :class:`FallbackOnError` (``jvp``, then ``loop``) for each call.

    Raises:
        ValueError: an unknown name.
    """
    resolved = resolve_hvp_method(name, device, mode)
    if name == "auto" and resolved == "jvp":
        return FallbackOnError(_STRATEGIES["jvp"], _STRATEGIES["loop"])
    return _STRATEGIES[resolved]
