"""Where a non-finite loss began: replay the run from its last good checkpoint with every layer checked.

A NaN loss is only seen steps after the gradient that caused it (a NaN grad makes NaN
weights, which make the next loss NaN). Training is deterministic and resume is exact,
so the steps since the last good checkpoint can be replayed with per-step checks on
every layer: a non-finite output from finite inputs, a non-finite input grad from finite
output grads, or a non-finite parameter grad. The first such event names the culprit.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from trainer import checkpoint, layers
from trainer.config import Config
from trainer.errors import ConfigError
from trainer.logs import RunLog
from trainer.loop import Trainer


def finite(values) -> bool:
    return all(v is None or not torch.is_tensor(v) or bool(torch.isfinite(v).all()) for v in values)


def describe(path: str, module: nn.Module) -> str:
    info = layers.impl_of(module)
    kind = f"{info[0]}, {info[1]}" if info else type(module).__name__
    return f"layer {path} ({kind})"


class _Found(Exception):
    pass


class Replay(Trainer):
    """The run's own loop from its newest good checkpoint, checking every layer at every step until ``until``."""

    def __init__(self, cfg: Config, run_dir, until: int):
        has_checkpoint = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
        super().__init__(cfg, resume=run_dir if has_checkpoint else None)
        self.until, self.events, self.handles = until, [], []
        self.log = RunLog(None, total=None, initial=0, progress=False, enabled=False)
        modules = {p: m for p, m in self.model.named_modules() if not list(m.children())}
        if isinstance(self.loss_fn, nn.Module):
            modules["loss"] = self.loss_fn
        for path, m in modules.items():
            self.handles.append(m.register_forward_hook(self._forward_check(path)))
            self.handles.append(m.register_full_backward_hook(self._backward_check(path)))

    def _forward_check(self, path: str):
        def hook(module, args, out):
            if finite(args) and not finite([out]):
                self.events.append(f"{describe(path, module)} made a non-finite output from finite inputs "
                                   f"at step {self.step + 1}")
        return hook

    def _backward_check(self, path: str):
        def hook(module, grad_input, grad_output):
            if finite(grad_output) and not finite(grad_input):
                self.events.append(f"{describe(path, module)} turned finite output grads into a non-finite "
                                   f"input grad at step {self.step + 1}")
        return hook

    def run(self) -> str | None:
        if self._rng is not None:
            checkpoint.set_rng_state(self._rng)
        try:
            with warnings.catch_warnings():  # full backward hooks on layers whose inputs need no grad say so
                warnings.simplefilter("ignore", UserWarning)
                while self.step < self.until:
                    self.train_epoch()
        except _Found:
            pass
        finally:
            for h in self.handles:
                h.remove()
        return self.events[0] if self.events else None

    def on_step(self) -> None:
        for path, m in self.model.named_modules():
            for name, p in m.named_parameters(recurse=False):
                if p.grad is not None and not finite([p.grad]):
                    self.events.append(f"{describe(path, m)} got a non-finite grad for {name} at step {self.step}")
        if self.events or not finite(self._window[-1:]) or self.step >= self.until:
            raise _Found

    def log_train(self) -> None:  # nothing is logged or saved while replaying
        pass

    def validate(self) -> None:
        pass

    def save(self, best: bool = False) -> None:
        pass


def first_nonfinite(cfg: Config, run_dir, step: int) -> str | None:
    """Replay ``run_dir`` up to ``step`` and describe where the first non-finite value appeared."""
    try:
        return Replay(cfg, run_dir, step).run()
    except ConfigError:
        return None
