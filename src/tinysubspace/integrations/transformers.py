"""Track the tiny subspace in a Hugging Face ``Trainer`` run: ``SubspaceCallback`` (``pip install
tinysubspace[transformers]``).

::

    from tinysubspace.integrations.transformers import SubspaceCallback

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[SubspaceCallback(k=10, out="runs/hf")])
    trainer.train()

Batches are dicts with ``labels``; the model is called as ``model(**batch)`` and its own loss
(``outputs.loss``, a mean over the labels) is the loss measured, except where it would lose the
measurement's precision: Hugging Face computes it after ``logits.float()``, so with
``dtype=torch.float64`` a causal LM (a ``...ForCausalLM`` class) is measured with
:func:`~tinysubspace.curvature.losses.causal_lm_loss` (the same loss in float64), and any other
model's float32 loss gives a ``UserWarning`` (pass ``loss_fn=``). At the beginning of each
optimizer step (before its update) the callback calls
:meth:`~tinysubspace.SubspaceTracker.on_step` with ``state.global_step``, and at the end of
training it measures the final parameters. It measures on the trainer's train dataloader (a
sequential copy: the training order is untouched) or on the ``data`` given.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as error:
    raise ImportError("tinysubspace.integrations.transformers needs transformers: "
                      "pip install tinysubspace[transformers]") from error

from tinysubspace.curvature.losses import causal_lm_loss
from tinysubspace.experiments.subspace_tracker import SubspaceTracker

__all__ = ["SubspaceCallback", "measured_loss", "model_loss"]


def model_loss(outputs: Any, labels: Any) -> Any:
    """The loss a Hugging Face model computed from the ``labels`` it was given."""
    loss = outputs["loss"] if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: the batches need 'labels' (or pass "
                         "loss_fn=)")
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits",
                                                                              None)
    if (isinstance(logits, torch.Tensor) and logits.is_floating_point()
            and torch.finfo(loss.dtype).eps > torch.finfo(logits.dtype).eps):
        warnings.warn(f"the model's own loss is {loss.dtype} while its logits are "
                      f"{logits.dtype}: the loss, gradient and H·v are only {loss.dtype}-"
                      f"accurate; pass loss_fn= a loss computed from the logits (for a causal "
                      f"LM: tinysubspace.causal_lm_loss)", UserWarning, stacklevel=2)
    return loss


def measured_loss(model: Any, loss_fn: Callable, dtype: Any) -> Callable:
    """The loss to measure: ``loss_fn``, except the model's own loss of a causal LM
    (``type(model).__name__`` ends in ``ForCausalLM``) measured in a dtype finer than float32,
    which becomes :func:`~tinysubspace.curvature.losses.causal_lm_loss` (Hugging Face's own
    loss is computed in float32). Causal LMs are the classes of Hugging Face's causal-LM auto
    mapping (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...) and any ``...ForCausalLM``."""
    finer = isinstance(dtype, torch.dtype) and dtype.is_floating_point and \
        torch.finfo(dtype).eps < torch.finfo(torch.float32).eps
    finer = finer or dtype in ("float64", "double")
    if loss_fn is model_loss and finer and _is_causal_lm(model):
        return causal_lm_loss
    return loss_fn


def _is_causal_lm(model: Any) -> bool:
    name = type(model).__name__
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - an older transformers
        return name.endswith("ForCausalLM")
    return name.endswith("ForCausalLM") or name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class SubspaceCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that runs a :class:`~tinysubspace.SubspaceTracker`.

    Args:
        loss_fn: ``loss_fn(outputs, labels)`` (default: the model's own loss; in float64, a
            causal LM's is computed by ``causal_lm_loss``: :func:`measured_loss`).
        data: what to measure on (default: the trainer's train dataloader).
        measure_last: also measure at the end of training.
        **options: the tracker's arguments (``k``, ``schedule``, ``out``, ``loggers``,
            ``budget``, ``subset``, ``dtype``, ...); ``optimizer="trainer"`` tracks the
            trainer's optimizer (unwrapped from accelerate's ``AcceleratedOptimizer``).
    """

    def __init__(self, loss_fn: Callable = model_loss, data: Any = None,
                 measure_last: bool = True, **options: Any) -> None:
        self.loss_fn, self.data, self.measure_last = loss_fn, data, measure_last
        self.options = options
        self.tracker: SubspaceTracker | None = None
        self.rows: list[dict[str, float]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        data = self.data if self.data is not None else train_dataloader
        if data is None or model is None:
            raise ValueError("SubspaceCallback: the trainer gave no model or train dataloader; "
                             "pass data=")
        options = dict(self.options)
        if isinstance(options.get("optimizer"), str) and options["optimizer"] == "trainer":
            optimizer = kwargs.get("optimizer")
            if optimizer is None:
                raise ValueError("SubspaceCallback(optimizer='trainer'): the trainer gave no "
                                 "optimizer to on_train_begin")
            options["optimizer"] = getattr(optimizer, "optimizer", optimizer)
        loss_fn = measured_loss(model, self.loss_fn, options.get("dtype"))
        self.tracker = SubspaceTracker(model, loss_fn, data, **options)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record(self.tracker.on_step(int(state.global_step)))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is None:
            return
        self._record(self.tracker.on_step(int(state.global_step), force=self.measure_last))
        self.tracker.close()

    def _record(self, row: dict[str, float] | None) -> None:
        if row is not None:
            self.rows.append(row)
