"""Attaches the checking callbacks a config asks for to every Trainer: imported, it registers them with the loop.

``trainer.callbacks.BUILT_IN`` gets ``config_callbacks``: ``Shadow`` when ``compare.every`` is
set, ``Diagnosis`` when a single-process run has layers running their custom twins.
``from trainer import Trainer`` and the CLI import this module; the loop never does.
"""
from __future__ import annotations

from trainer import callbacks
from trainer.check.capture import swapped_layers
from trainer.check.diagnose import Diagnosis
from trainer.check.shadow import Shadow


def config_callbacks(trainer) -> list[callbacks.Callback]:
    """The checking callbacks ``trainer.cfg`` asks for."""
    out: list[callbacks.Callback] = []
    cmp = trainer.cfg.compare
    if cmp.every:  # the builder made sure that some layer runs custom
        out.append(Shadow(trainer.model, trainer.loss_fn, cmp.every, cmp.rtol, cmp.atol, fail=cmp.fail))
    if not trainer.env.distributed and swapped_layers(trainer.model, trainer.loss_fn):  # twins: find a NaN's culprit
        out.append(Diagnosis())
    return out


callbacks.BUILT_IN.append(config_callbacks)
