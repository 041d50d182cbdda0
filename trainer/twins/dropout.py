"""Dropout: the Function, then its twin. On the CPU the mask is drawn as native draws it (``bernoulli_(1 - p)``
on a tensor like x), so one seed gives native's mask and bitwise-equal grads; on CUDA native's fused kernel draws in
an order no tensor ops reproduce, so the mask and product come from ``torch.native_dropout`` (one mask per seed)."""
from __future__ import annotations

import torch
from torch import nn

from trainer.twins import amp


def keep_scale(p: float, like: torch.Tensor) -> torch.Tensor:
    """``1 / (1 - p)`` rounded to x's dtype as native rounds its mask (``noise.div_(1 - p)``), so y matches bitwise."""
    return torch.ones((), dtype=like.dtype, device=like.device) / (1 - p)


class DropoutFunction(torch.autograd.Function):
    """``y = x m / (1 - p)`` with m ~ Bernoulli(1 - p), or x itself (a view) when not ``train`` or ``p == 0``.

    Returns ``(y, m)``: the bool mask (1 B/elem) is an output so that it can be saved, None when nothing is random.
    Multiplying by m keeps native's ``x * 0`` where it drops (-0, NaN for inf)."""
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
        return amp.apply(DropoutFunction, amp.KEEP, x, self.p, self.training)[0]
