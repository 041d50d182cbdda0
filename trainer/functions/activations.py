"""Elementwise activations: math helpers, then the Function, then the twin, one block per op."""
from __future__ import annotations

import torch
from torch import nn

from trainer import layers
from trainer.functions import amp
from trainer.layers import Case


def _randn(*shape: int, low: float = 0.05):
    """Standard-normal float64 samples kept at least ``low`` away from zero (away from kinks)."""
    def make(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return (x.sign() * x.abs().clamp_min(low) + (x == 0) * low,)
    return make


def _values(*vals: float):
    """A fixed input holding exactly ``vals`` (edge values compared with native)."""
    return lambda gen: (torch.tensor(vals, dtype=torch.float64),)


# --- relu -------------------------------------------------------------------------------

def relu_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # d relu/dx = 1 where y > 0, else 0; native gives 0 at x == 0 (threshold_backward(g, y, 0))
    return torch.where(y > 0, g, 0)


class ReLUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # y is the next layer's input anyway: saving it costs nothing

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return relu_backward(g, y)


class CustomReLU(nn.ReLU):
    """``nn.ReLU`` computed by ``ReLUFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = ReLUFunction

    def forward(self, x):
        return amp.apply(ReLUFunction, amp.KEEP, x)


layers.register(
    "relu", native=nn.ReLU, custom=CustomReLU, saves="y (output)",
    cases=lambda: [
        Case("relu", nn.ReLU, _randn(4, 7)),
        Case("relu-zeros", nn.ReLU, _values(-1.0, -0.0, 0.0, 0.5, 2.0), gradcheck=False),
    ],
)
