"""Dropout: the mask and scale helpers, the Function, then the twin.

The mask is drawn exactly as native CPU dropout draws it (``bernoulli_(1 - p)`` on a
tensor shaped like x: the draws do not depend on that tensor's dtype), so one seed
gives one mask and the same next draw in both implementations; it is kept as a bool
tensor, 1 byte per element, where native keeps a float mask of x's dtype. On the CPU,
outputs and grads equal native's bit for bit, in every dtype.

On CUDA native dropout is one fused kernel (``torch.native_dropout``) whose Philox draws
depend on how it splits the tensor among threads, which no sequence of tensor ops
reproduces. There the twin takes the mask, and the product, from that kernel, so one seed
still gives one mask in both implementations (``trainer compare`` and shadow mode rely on
that). The saving (the bool mask) and the backward are the twin's own on every device.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.twins import amp, registry
from trainer.twins.registry import Case


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """True where x is kept, with probability 1 - p; the same draws as ``torch.empty_like(x).bernoulli_(1 - p)``."""
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)


def dropout_scale(p: float, like: torch.Tensor) -> torch.Tensor:
    """``1 / (1 - p)`` rounded as native rounds its mask (``noise.div_(1 - p)`` in x's dtype), so y matches bitwise."""
    return torch.ones((), dtype=like.dtype, device=like.device).div_(1 - p)


def dropout_backward(g: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    # d(x m / (1 - p))/dx = m / (1 - p); p == 1 drops everything (native multiplies by 0)
    return g * 0 if mask is None else g.mul(mask).mul_(dropout_scale(p, g))



class DropoutFunction(torch.autograd.Function):
    """``y = x * m / (1 - p)``, or ``x`` itself when not ``train`` or ``p == 0``. Returns ``(y, mask)``.

    Multiplying by the 0/1 mask (not selecting with it) keeps native's ``x * 0`` at
    dropped places: -0 for negative x, NaN for inf. The identity returns ``x`` as-is,
    so autograd hands back a view of it (no copy) with this Function's backward, which
    passes the grad through; unlike native's (which returns x itself), an in-place op
    on that view raises while grad is recorded: clone it first. Like native, the
    identity and p == 1 (``x * 0``) draw no random numbers. The mask is an output,
    marked non-differentiable, so that it can be saved under the new-style API; it is
    None when nothing is random. Backward is linear in g and does not read x, so
    double backward is exact.
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
        mask = dropout_mask(x, p)
        return x.mul(mask).mul_(dropout_scale(p, x)), mask

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, p, train = inputs
        _, mask = output
        ctx.p = p
        ctx.identity = not train or p == 0
        if mask is not None:
            ctx.mark_non_differentiable(mask)
        ctx.save_for_backward(mask)

    @staticmethod
    def backward(ctx, g, _):
        if ctx.identity:
            return g, None, None
        (mask,) = ctx.saved_tensors
        return dropout_backward(g, mask, ctx.p), None, None


class CustomDropout(nn.Dropout):
    """``nn.Dropout`` computed by ``DropoutFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = DropoutFunction

    def forward(self, x):
        y, _ = amp.apply(DropoutFunction, amp.KEEP, x, self.p, self.training)
        return y


def _randn(*shape: int):
    return lambda gen: (torch.randn(*shape, generator=gen, dtype=torch.float64),)


registry.register(
    "dropout", native=nn.Dropout, custom=CustomDropout, saves="bool mask (1 B/elem); nothing if p in {0, 1} or eval",
    cases=lambda: [
        Case("p0.3", lambda: nn.Dropout(0.3), _randn(4, 7)),
        Case("p0", lambda: nn.Dropout(0.0), _randn(4, 7)),
        Case("p1", lambda: nn.Dropout(1.0), _randn(4, 7)),
        Case("eval", lambda: nn.Dropout(0.5), _randn(4, 7), train=False),
        Case("p0.5-large", lambda: nn.Dropout(0.5), _randn(8, 16, 33), gradcheck=False),
    ],
)
