"""Dropout: the Function, then the twin.

On the CPU the mask is drawn as native draws it (``bernoulli_(1 - p)`` on a tensor shaped
like x, whatever its dtype), so one seed gives one mask, the same next draw, and outputs and
grads equal to native's bit for bit; it is kept as bool (1 B/elem), native's in x's dtype.
On CUDA native's fused kernel draws in an order no tensor ops reproduce, so the twin takes
the mask and the product from ``torch.native_dropout`` (``trainer compare`` and shadow mode
need one mask per seed); what it saves and its backward are its own on every device.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.twins import amp


def keep_scale(p: float, like: torch.Tensor) -> torch.Tensor:
    """``1 / (1 - p)`` rounded to x's dtype as native rounds its mask (``noise.div_(1 - p)``), so y matches bitwise."""
    return torch.ones((), dtype=like.dtype, device=like.device) / (1 - p)


class DropoutFunction(torch.autograd.Function):
    """``y = x m / (1 - p)`` with m ~ Bernoulli(1 - p), or ``x`` itself when not ``train`` or ``p == 0``.

    Returns ``(y, m)``: the bool mask is an output (non-differentiable) so that it can be saved,
    None when nothing is random. Multiplying by m keeps native's ``x * 0`` where it drops (-0,
    NaN for inf). Like native, the identity and p == 1 draw nothing. The identity's output is
    a view of x: an in-place op on it raises while grad is recorded (clone it first).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, p, train):
        if not train or p == 0:
            return x, None
        if p == 1:
            return x * 0, None
        if x.is_cuda:  # native's own draw: see the module docstring
            return torch.native_dropout(x, p, True)
        m = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
        return x * m * keep_scale(p, x), m

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.p, train = inputs
        ctx.identity = not train or ctx.p == 0
        if output[1] is not None:
            ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, g, _):
        (m,) = ctx.saved_tensors
        if ctx.identity:
            return g, None, None
        # dx = g m / (1 - p); p == 1 drops everything (m = 0)
        return (g * 0 if m is None else g * m * keep_scale(ctx.p, g)), None, None


class CustomDropout(nn.Dropout):
    """``nn.Dropout`` computed by ``DropoutFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = DropoutFunction

    def forward(self, x):
        y, _ = amp.apply(DropoutFunction, amp.KEEP, x, self.p, self.training)
        return y
