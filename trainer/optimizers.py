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


def _check(lr: float, weight_decay: float, eps: float | None = None, **fractions: float) -> None:
    """lr and eps positive, weight_decay 0 or more, each of ``fractions`` (momentum, alpha, ...) in [0, 1)."""
    if not lr > 0:
        raise ConfigError("lr", f"must be positive, got {lr}", suggestion="e.g. 0.01 for sgd, 0.001 for adam")
    if not weight_decay >= 0:
        raise ConfigError("weight_decay", f"must be 0 or more, got {weight_decay}")
    if eps is not None and not eps > 0:  # it keeps a division away from zero
        raise ConfigError("eps", f"must be positive, got {eps}", suggestion="e.g. 1e-8")
    for name, value in fractions.items():
        if not 0 <= value < 1:  # a running average's decay or momentum of 1 or more never forgets, or grows
            raise ConfigError(name, f"must be in [0, 1), got {value}")


def _betas(betas: list[float]) -> tuple[float, float]:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError("betas", f"expected two numbers in [0, 1), got {betas}", suggestion="e.g. [0.9, 0.999]")
    return betas[0], betas[1]


@register("sgd")
def sgd(params: Iterable, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
        weight_decay: float = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    _check(lr, weight_decay, momentum=momentum)
    if not 0 <= dampening <= 1:
        raise ConfigError("dampening", f"must be in [0, 1], got {dampening}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ConfigError("nesterov", "needs momentum > 0 and dampening 0")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening,
                           weight_decay=weight_decay, nesterov=nesterov)


@register("adam")
def adam(params: Iterable, lr: float = 0.001, betas: list[float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False) -> torch.optim.Optimizer:
    _check(lr, weight_decay, eps)
    return torch.optim.Adam(params, lr=lr, betas=_betas(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


@register("adamw")
def adamw(params: Iterable, lr: float = 0.001, betas: list[float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.01, amsgrad: bool = False) -> torch.optim.Optimizer:
    _check(lr, weight_decay, eps)
    return torch.optim.AdamW(params, lr=lr, betas=_betas(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


@register("rmsprop")
def rmsprop(params: Iterable, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
            momentum: float = 0.0, centered: bool = False) -> torch.optim.Optimizer:
    _check(lr, weight_decay, eps, momentum=momentum)
    if not 0 <= alpha <= 1:  # the squared-gradient average's smoothing constant
        raise ConfigError("alpha", f"must be in [0, 1], got {alpha}", suggestion="e.g. 0.99")
    return torch.optim.RMSprop(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                               momentum=momentum, centered=centered)
