"""A class index out of range found mid-run, named by its step, epoch and batch instead of torch's traceback.

``check_fit`` runs the first two samples before anything is written; a bad target further in
(class 7 for a 3-class model at step 500) shows only when its batch is trained. On the CPU
nothing is checked on the way: the loss raises (``IndexError: Target 7 is out of bounds``, the
twin as native), and only then ``explain`` looks at the batch's targets, so a healthy step pays
nothing. On CUDA the loss would hit a device-side assert instead, which surfaces at a later sync,
in no particular step, and leaves the device unusable; there ``on_host`` checks each batch's
targets where they already are, on the host, before they are copied (no device sync).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


class BadTargets(RuntimeError):
    """A batch's targets hold a value that is not a class index of the model's outputs; the run stopped.

    A run-time failure (exit 1, like a non-finite loss): the run directory and its checkpoints
    exist by then, and the last good checkpoint is kept.
    """

    def __init__(self, step: int, epoch: int, batch: int, value: int, classes: int, kept: bool):
        self.step, self.epoch, self.batch, self.value, self.classes = step, epoch, batch, value, classes
        tail = "the last good checkpoint is kept" if kept else "no checkpoint had been saved yet"
        super().__init__(f"step {step} (epoch {epoch + 1}, batch {batch} of the epoch, from 0): the targets hold "
                         f"class index {value}, but the model gives {classes} classes, so targets must be in "
                         f"[0, {classes - 1}]; stopped, {tail} (fix the dataset's targets or the model's "
                         "number of outputs)")


def out_of_range(model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                 device: torch.device) -> tuple[int, int] | None:
    """``(value, classes)`` for the first target of (x, y) outside ``[0, classes)``, or None.

    ``classes`` is the model's output size along dim 1, measured by running it on ``x``;
    the loss's ``ignore_index`` counts as valid.
    """
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex():
        return None
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(device))
    except Exception:  # noqa: BLE001  (the model itself fails: not a target problem)
        return None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return None
    value = first_bad(y, out.shape[1], getattr(loss_fn, "ignore_index", None))
    return None if value is None else (value, out.shape[1])


def first_bad(y: torch.Tensor, classes: int, ignore: int | None) -> int | None:
    """The first value of class-index targets ``y`` outside ``[0, classes)`` (``ignore`` allowed), or None."""
    y = y.detach().cpu()
    bad = (y < 0) | (y >= classes)
    if ignore is not None:
        bad &= y != ignore
    return int(y[bad][0]) if bool(bad.any()) else None


def explain(trainer, batches: list, error: BaseException) -> BadTargets | None:
    """The ``BadTargets`` behind ``error``, raised by ``trainer`` training ``batches`` (its next step), or None."""
    if not isinstance(error, (IndexError, RuntimeError)):
        return None
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            return None
        found = out_of_range(trainer.model, trainer.loss_fn, batch[0], batch[1], trainer.device)
        if found is not None:
            return BadTargets(trainer.step + 1, trainer.epoch, trainer.batch_in_epoch + i, *found,
                              kept=trainer._saved_at >= 0)
    return None


def on_host(trainer, batches: Iterator) -> Iterator:
    """``batches`` (this epoch's, from ``trainer.batch_in_epoch`` on), each one's class-index targets checked
    on the host before the step copies them to the device; raises ``BadTargets`` for the first bad one.

    Only a loss that reads class indices (one with ``ignore_index``: cross entropy, NLL) is checked: a user's
    own loss may give integer targets another meaning."""
    if not hasattr(trainer.loss_fn, "ignore_index"):
        yield from batches
        return
    classes, ignore = None, trainer.loss_fn.ignore_index
    for index, batch in enumerate(batches, start=trainer.batch_in_epoch):
        x, y = batch
        if isinstance(y, torch.Tensor) and not (y.is_floating_point() or y.is_complex()):
            lo, hi = torch.aminmax(y)  # one pass over a host tensor: no device sync
            if classes is None:  # the model's output size, once per epoch (eval mode: no dropout, no RNG)
                found = out_of_range(trainer.model, trainer.loss_fn, x, y, trainer.device)
                if found is not None:
                    raise BadTargets(trainer.step + 1, trainer.epoch, index, *found, kept=trainer._saved_at >= 0)
                classes = _classes(trainer.model, x, trainer.device)
            if classes and (lo < 0 or hi >= classes) and (value := first_bad(y, classes, ignore)) is not None:
                raise BadTargets(trainer.step + 1, trainer.epoch, index, value, classes, kept=trainer._saved_at >= 0)
        yield batch


def _classes(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> int:
    """The model's output size along dim 1 for input ``x`` (0 when it has no such dim)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(device))
    finally:
        model.train(was)
    return out.shape[1] if isinstance(out, torch.Tensor) and out.dim() >= 2 else 0
