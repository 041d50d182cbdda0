"""The loss registry. Each built-in is also a swappable layer (``trainer.layers``) with a custom twin."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.registry import Registry

REGISTRY: Registry = Registry("loss")
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names

# no "none": a training step backpropagates one number, not one loss per sample
Reduction = Literal["mean", "sum"]


@register("mse")
def mse(reduction: Reduction = "mean") -> nn.Module:
    return nn.MSELoss(reduction=reduction)


@register("l1")
def l1(reduction: Reduction = "mean") -> nn.Module:
    return nn.L1Loss(reduction=reduction)


@register("huber")
def huber(delta: float = 1.0, reduction: Reduction = "mean") -> nn.Module:
    if not delta > 0:
        raise ConfigError("delta", f"must be positive, got {delta}")
    return nn.HuberLoss(reduction=reduction, delta=delta)


@register("cross_entropy")
def cross_entropy(weight: list[float] | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: Reduction = "mean") -> nn.Module:
    """Cross-entropy over class indices (or class probabilities) from logits.

    Args:
        weight: one weight per class (null: all 1).
        ignore_index: a target value whose rows add nothing to the loss or its gradient.
        label_smoothing: in [0, 1]; mixes the target with the uniform distribution.
        reduction: mean (over the weights of the rows kept) or sum.
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ConfigError("label_smoothing", f"must be in [0, 1], got {label_smoothing}")
    w = torch.tensor(weight, dtype=torch.float32) if weight is not None else None
    return nn.CrossEntropyLoss(weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing,
                               reduction=reduction)


@register("bce_with_logits")
def bce_with_logits(pos_weight: list[float] | None = None, reduction: Reduction = "mean") -> nn.Module:
    """Binary cross-entropy from logits; ``pos_weight`` weighs the positive class (one per output)."""
    pw = torch.tensor(pos_weight, dtype=torch.float32) if pos_weight is not None else None
    return nn.BCEWithLogitsLoss(pos_weight=pw, reduction=reduction)
