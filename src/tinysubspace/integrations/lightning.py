"""Track the tiny subspace in a PyTorch Lightning run: ``SubspaceCallback`` (``pip install
tinysubspace[lightning]``).

::

    from tinysubspace.integrations.lightning import SubspaceCallback

    callback = SubspaceCallback(F.cross_entropy, k=10, out="runs/lit")
    Trainer(max_steps=500, callbacks=[callback]).fit(module, train_loader)
    ts.load_run("runs/lit")

At the start of each training batch (before its update) the callback calls
:meth:`~tinysubspace.SubspaceTracker.on_step` with ``trainer.global_step``; at the end of
training it measures the final parameters. It measures on the trainer's train dataloader (a
sequential copy of it: the training order is untouched) or on the ``data`` given. Under DDP
every rank measures (on the whole data set unless you pass its shard) and rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError as error:
        raise ImportError("tinysubspace.integrations.lightning needs PyTorch Lightning: "
                          "pip install tinysubspace[lightning]") from error

from tinysubspace.experiments.subspace_tracker import SubspaceTracker

__all__ = ["SubspaceCallback"]


class SubspaceCallback(Callback):
    """A Lightning callback that runs a :class:`~tinysubspace.SubspaceTracker`.

    Args:
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch (Lightning modules
            compute theirs inside ``training_step``, which is no function of the outputs).
        data: what to measure on (default: the trainer's train dataloader).
        measure_last: also measure at the end of training.
        **options: the tracker's arguments (``k``, ``schedule``, ``out``, ``loggers``,
            ``budget``, ``subset``, ``dtype``, ...). A logger named ``"trainer"`` sends the
            rows to ``trainer.logger.log_metrics``; ``optimizer="trainer"`` tracks the
            trainer's (only) optimizer (threshold, preconditioned top-k, update share).
    """

    def __init__(self, loss_fn: Callable, data: Any = None, measure_last: bool = True,
                 **options: Any) -> None:
        super().__init__()
        self.loss_fn, self.data, self.measure_last = loss_fn, data, measure_last
        self.options = options
        self.tracker: SubspaceTracker | None = None
        self.rows: list[dict[str, float]] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        data = self.data if self.data is not None else trainer.train_dataloader
        if data is None:
            raise ValueError("SubspaceCallback: the trainer has no train dataloader; pass data=")
        options = dict(self.options)
        loggers = options.get("loggers")
        if loggers is not None and "trainer" in loggers:
            options["loggers"] = [_trainer_logger(trainer) if spec == "trainer" else spec
                                  for spec in loggers]
        if isinstance(options.get("optimizer"), str) and options["optimizer"] == "trainer":
            options["optimizer"] = _only_optimizer(trainer.optimizers)
        self.tracker = SubspaceTracker(pl_module, self.loss_fn, data, **options)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        self._record(self.tracker.on_step(int(trainer.global_step)))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.tracker is None:
            return
        self._record(self.tracker.on_step(int(trainer.global_step), force=self.measure_last))
        self.tracker.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.tracker is not None:
            self.tracker.close("stopped", f"{type(exception).__name__}: {exception}")

    def _record(self, row: dict[str, float] | None) -> None:
        if row is not None:
            self.rows.append(row)


def _only_optimizer(optimizers: list[Any]) -> Any:
    if len(optimizers) != 1:
        raise ValueError(f"SubspaceCallback(optimizer='trainer') needs exactly one optimizer, "
                         f"the trainer has {len(optimizers)}; pass optimizer= yourself")
    return optimizers[0]


def _trainer_logger(trainer: Any) -> Callable[[dict[str, float], int], None]:
    def log(row: dict[str, float], step: int) -> None:
        if trainer.logger is not None:
            trainer.logger.log_metrics({k: v for k, v in row.items() if v is not None}, step)
    return log
