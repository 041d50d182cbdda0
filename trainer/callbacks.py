"""The training loop's one extension point: callbacks that run around each step.

A callback subclasses ``Callback`` and overrides what it needs; ``Trainer(cfg, callbacks=[...])``
runs them in order. Shadow mode and the NaN diagnosis of ``trainer.check`` attach the same way:
``trainer.check`` adds them to ``BUILT_IN`` when imported (``from trainer import Trainer`` and
the CLI import it), so the loop itself never imports the tools built on top of it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Annotations name the Trainer as a string: this module is below the loop and never imports it.


class Callback:
    """Per-step work attached to a ``Trainer`` from outside; every method does nothing unless overridden.

    Example:
        class LogWeightNorm(Callback):
            def after_step(self, trainer, loss):
                if trainer.step % 100 == 0:
                    norm = sum(float(p.norm()) ** 2 for p in trainer.model.parameters()) ** 0.5
                    trainer.log.scalars(trainer.step, {"custom/weight_norm": norm})
    """

    def before_step(self, trainer: "Trainer") -> None:
        """Before optimizer step ``trainer.step + 1`` runs (its micro-batches not yet fetched)."""

    def after_step(self, trainer: "Trainer", loss: torch.Tensor) -> None:
        """After step ``trainer.step``: ``loss`` is its detached mean loss on the device (``float(loss)`` syncs).

        Runs after the step's scalars are logged and before validation, checkpoints and the
        interrupt check of the same step.
        """

    def on_error(self, trainer: "Trainer", error: BaseException) -> None:
        """The run is stopping with ``error`` (``NonFiniteLoss``, ``Interrupted``, ...), which is re-raised after."""

    def on_end(self, trainer: "Trainer") -> None:
        """``fit`` finished: the last validation, checkpoint and hparams are written."""


# Factories of the built-in callbacks a config asks for (``compare.every``: shadow mode; twins in
# the model: NaN diagnosis). ``trainer.check`` appends its factory here when it is imported.
BUILT_IN: list[Callable[[Any], list[Callback]]] = []


def built_in(trainer: "Trainer") -> list[Callback]:
    """The callbacks ``trainer``'s config asks for, from every registered factory."""
    return [cb for factory in BUILT_IN for cb in factory(trainer)]
