"""Where a non-finite loss began: replay the run from its last good checkpoint with every layer checked.

A NaN loss is only seen steps after the gradient that caused it (a NaN grad makes NaN
weights, which make the next loss NaN). Training is deterministic and resume is exact,
so the steps since the last good checkpoint can be replayed with per-step checks on
every layer: a non-finite output from finite inputs, a non-finite input grad from finite
output grads, or a non-finite parameter grad. The first such event names the culprit.
``Diagnosis`` is the callback that runs this when a run with twins stops on a NaN.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from trainer import checkpoint, layers
from trainer.callbacks import Callback
from trainer.config import Config
from trainer.errors import ConfigError
from trainer.loop import NonFiniteLoss, Trainer


def finite(values) -> bool:
    return all(v is None or not torch.is_tensor(v) or bool(torch.isfinite(v).all()) for v in values)


def describe(path: str, module: nn.Module) -> str:
    info = layers.impl_of(module)
    kind = f"{info[0]}, {info[1]}" if info else type(module).__name__
    return f"layer {path} ({kind})"


class LayerWatch:
    """Hooks on every leaf module of a trainer's model (and its loss) that record non-finite events, in order."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.events, self.handles = trainer, [], []
        modules = {p: m for p, m in trainer.model.named_modules() if not list(m.children())}
        if isinstance(trainer.loss_fn, nn.Module):
            modules["loss"] = trainer.loss_fn
        for path, m in modules.items():
            self.handles.append(m.register_forward_hook(self._forward_check(path)))
            self.handles.append(m.register_full_backward_hook(self._backward_check(path)))

    def _forward_check(self, path: str):
        def hook(module, args, out):
            if finite(args) and not finite([out]):
                self.events.append(f"{describe(path, module)} made a non-finite output from finite inputs "
                                   f"at step {self.trainer.step + 1}")
        return hook

    def _backward_check(self, path: str):
        def hook(module, grad_input, grad_output):
            if finite(grad_output) and not finite(grad_input):
                self.events.append(f"{describe(path, module)} turned finite output grads into a non-finite "
                                   f"input grad at step {self.trainer.step + 1}")
        return hook

    def check_grads(self) -> None:
        """After a step: a non-finite parameter grad is an event too."""
        for path, m in self.trainer.model.named_modules():
            for name, p in m.named_parameters(recurse=False):
                if p.grad is not None and not finite([p.grad]):
                    self.events.append(f"{describe(path, m)} got a non-finite grad for {name} "
                                       f"at step {self.trainer.step}")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def first_nonfinite(cfg: Config, run_dir: Path, step: int) -> str | None:
    """Replay ``run_dir`` up to ``step`` and describe where the first non-finite value appeared.

    A fresh Trainer (nothing written) restores the newest good checkpoint, if any, and
    runs the same training steps with every layer watched; None when nothing is found.
    """
    try:
        trainer = Trainer(cfg)
    except ConfigError:
        return None
    ckpts = checkpoint.Checkpoints(Path(run_dir), cfg.train.keep_checkpoints)
    if ckpts.dir.is_dir() and any(ckpts.dir.iterdir()):
        try:
            state, _, _ = ckpts.load()
        except ConfigError:
            return None
        trainer.restore(state)
        checkpoint.set_rng_state(state["rng"])
    watch = LayerWatch(trainer)
    try:
        with warnings.catch_warnings():  # full backward hooks on layers whose inputs need no grad say so
            warnings.simplefilter("ignore", UserWarning)
            replay(trainer, watch, step)
    finally:
        watch.remove()
    return watch.events[0] if watch.events else None


def replay(trainer: Trainer, watch: LayerWatch, until: int) -> None:
    """The run's own steps from the trainer's position, until ``until``, an event or a non-finite loss."""
    while trainer.step < until:
        for group in trainer.batch_groups():  # the run's groups: the order depends only on (seed, epoch)
            loss = trainer.train_step(group)
            trainer.batch_in_epoch += len(group)
            trainer.step += 1
            watch.check_grads()
            if watch.events or not finite([loss]) or trainer.step >= until:
                return
        trainer.epoch, trainer.batch_in_epoch = trainer.epoch + 1, 0  # the epoch's end, as in Trainer.train_epoch
        if trainer.scheduler is not None and trainer.scheduler.interval == "epoch":
            trainer.scheduler.step()


class Diagnosis(Callback):
    """When the run stops on a ``NonFiniteLoss``, attach ``first_nonfinite``'s finding as its ``diagnosis``."""

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        if isinstance(error, NonFiniteLoss) and trainer.run_dir is not None:
            error.diagnosis = first_nonfinite(trainer.cfg, trainer.run_dir, error.step)
