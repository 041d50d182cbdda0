"""The LR scheduler registry. Each scheduler carries ``interval``: stepped per "step", per "epoch" or per "metric"."""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch.optim import lr_scheduler

from trainer.errors import ConfigError
from trainer.registry import Registry

REGISTRY: Registry = Registry("scheduler")
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names

# Arguments the trainer passes itself; a config cannot set them.
INJECTED = ("optimizer", "total_steps", "steps_per_epoch")


def _every(scheduler, interval: str):
    scheduler.interval = interval
    return scheduler


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(name, f"must be positive, got {value}")


def _not_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ConfigError(name, f"must be 0 or more, got {value}")


def _length(total_steps: int | None, name: str) -> int:
    if total_steps is None:
        raise ConfigError("name", f"{name} needs to know the run's length",
                          suggestion="set train.max_steps or train.max_epochs")
    return total_steps


@register("step")
def step(optimizer: torch.optim.Optimizer, total_steps: int | None, steps_per_epoch: int,
         step_size: int = 30, gamma: float = 0.1):
    """Multiply the LR by ``gamma`` every ``step_size`` epochs."""
    if step_size < 1:
        raise ConfigError("step_size", f"must be at least 1 (epochs), got {step_size}")
    _positive(gamma=gamma)
    return _every(lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma), "epoch")


@register("multistep")
def multistep(optimizer: torch.optim.Optimizer, total_steps: int | None, steps_per_epoch: int,
              milestones: list[int] = (30, 60), gamma: float = 0.1):
    """Multiply the LR by ``gamma`` at each epoch in ``milestones``."""
    for i, m in enumerate(milestones):
        if m < 1:
            raise ConfigError(f"milestones[{i}]", f"must be at least 1 (an epoch), got {m}")
    _positive(gamma=gamma)
    return _every(lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma), "epoch")


@register("cosine")
def cosine(optimizer: torch.optim.Optimizer, total_steps: int | None, steps_per_epoch: int,
           warmup_steps: int = 0, min_lr: float = 0.0):
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr`` at the last step; per step."""
    total = _length(total_steps, "cosine")
    _not_negative(warmup_steps=warmup_steps, min_lr=min_lr)
    for g in optimizer.param_groups:
        if min_lr > g["lr"]:
            raise ConfigError("min_lr", f"{min_lr} is above the optimizer's lr {g['lr']}: the LR would rise",
                              suggestion="set min_lr at or below optimizer.lr")

    def factor(base: float):
        def f(i: int) -> float:
            if i < warmup_steps:
                return (i + 1) / warmup_steps
            t = min(1.0, (i - warmup_steps) / max(1, total - warmup_steps))
            return (min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))) / base
        return f

    return _every(lr_scheduler.LambdaLR(optimizer, [factor(g["lr"]) for g in optimizer.param_groups]), "step")


@register("onecycle")
def onecycle(optimizer: torch.optim.Optimizer, total_steps: int | None, steps_per_epoch: int,
             max_lr: float = 0.1, pct_start: float = 0.3, anneal_strategy: Literal["cos", "linear"] = "cos",
             div_factor: float = 25.0, final_div_factor: float = 1e4):
    """The 1cycle policy over the whole run; per step."""
    total = _length(total_steps, "onecycle")
    _positive(max_lr=max_lr, div_factor=div_factor, final_div_factor=final_div_factor)
    if not 0 < pct_start < 1:
        raise ConfigError("pct_start", f"must be in (0, 1), got {pct_start}")
    return _every(lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, pct_start=pct_start,
                                          anneal_strategy=anneal_strategy, div_factor=div_factor,
                                          final_div_factor=final_div_factor), "step")


@register("plateau")
def plateau(optimizer: torch.optim.Optimizer, total_steps: int | None, steps_per_epoch: int,
            monitor: Literal["val/loss"] = "val/loss", mode: Literal["min", "max"] = "min",
            factor: float = 0.1, patience: int = 10, threshold: float = 1e-4, min_lr: float = 0.0):
    """Cut the LR by ``factor`` when ``monitor`` (``val/loss``, the one choice) stalls for ``patience`` checks.

    Stepped after each validation.
    """
    if not 0 < factor < 1:
        raise ConfigError("factor", f"must be in (0, 1), got {factor}", suggestion="e.g. 0.1")
    _not_negative(patience=patience, threshold=threshold, min_lr=min_lr)
    s = lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience,
                                       threshold=threshold, min_lr=min_lr)
    s.monitor = monitor
    return _every(s, "metric")
