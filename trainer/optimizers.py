"""The optimizer registry: sgd, adam, adamw, rmsprop, with their hyperparameters checked."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from trainer.errors import ConfigError
from trainer.registry import Registry

REGISTRY: Registry = Registry("optimizer")
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


def _check(lr: float, weight_decay: float, **more: float) -> None:
    if not lr > 0:
        raise ConfigError("lr", f"must be positive, got {lr}", suggestion="e.g. 0.01 for sgd, 0.001 for adam")
    for name, value in {"weight_decay": weight_decay, **more}.items():
        if not value >= 0:
            raise ConfigError(name, f"must be 0 or more, got {value}")


def _betas(betas: list[float]) -> tuple[float, float]:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError("betas", f"expected two numbers in [0, 1), got {betas}", suggestion="e.g. [0.9, 0.999]")
    return betas[0], betas[1]


@register("sgd")
def sgd(params: Iterable, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
        weight_decay: float = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    _check(lr, weight_decay, momentum=momentum, dampening=dampening)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ConfigError("nesterov", "needs momentum > 0 and dampening 0")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening,
                           weight_decay=weight_decay, nesterov=nesterov)


@register("adam")
def adam(params: Iterable, lr: float = 0.001, betas: list[float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False) -> torch.optim.Optimizer:
    _check(lr, weight_decay, eps=eps)
    return torch.optim.Adam(params, lr=lr, betas=_betas(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


@register("adamw")
def adamw(params: Iterable, lr: float = 0.001, betas: list[float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.01, amsgrad: bool = False) -> torch.optim.Optimizer:
    _check(lr, weight_decay, eps=eps)
    return torch.optim.AdamW(params, lr=lr, betas=_betas(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


@register("rmsprop")
def rmsprop(params: Iterable, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
            momentum: float = 0.0, centered: bool = False) -> torch.optim.Optimizer:
    _check(lr, weight_decay, eps=eps, momentum=momentum, alpha=alpha)
    return torch.optim.RMSprop(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                               momentum=momentum, centered=centered)
