"""Softmax and LogSoftmax along one dim: the Function, then the twin, one block per op.

Both save only their output y (the next layer keeps it anyway), and their derivative is a
function of y alone. Half and bfloat16 are computed in float32 and rounded once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.twins import amp
from trainer.twins.amp import in_float32


def _dim(module: nn.Softmax | nn.LogSoftmax, x: torch.Tensor, name: str) -> int:
    """The module's dim, or native's legacy choice (with its warning, in eager only) when it is None."""
    if module.dim is not None:
        return module.dim
    if torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn; same rule as _get_softmax_dim
        return 0 if x.dim() in (0, 1, 3) else 1
    return F._get_softmax_dim(name, x.dim(), 5)


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    e = (x - x.amax(dim, keepdim=True)).exp()  # softmax(x) = e^z / Σ e^z with z = x − max x (no overflow)
    return e / e.sum(dim, keepdim=True)


def log_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    # log softmax(x) = z − log Σ e^z with z = x − max x: no overflow, and (as native) large rows keep precision
    z = x - x.amax(dim, keepdim=True)
    return z - z.exp().sum(dim, keepdim=True).log()


# --- softmax -------------------------------------------------------------------------------


class SoftmaxFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x, dim):
        return softmax(x, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return softmax_backward(g, y, ctx.dim), None


@in_float32
def softmax_backward(g, y, dim):
    return y * (g - (g * y).sum(dim, keepdim=True))  # dx = y ⊙ (g − Σ_dim g ⊙ y)


class CustomSoftmax(nn.Softmax):
    """``nn.Softmax`` computed by ``SoftmaxFunction``."""

    function = SoftmaxFunction

    def forward(self, x):
        return amp.apply(SoftmaxFunction, amp.FP32_ON_CUDA, x, _dim(self, x, "softmax"))


# --- log_softmax ---------------------------------------------------------------------------


class LogSoftmaxFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x, dim):
        return log_softmax(x, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)  # softmax is e^y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return log_softmax_backward(g, y, ctx.dim), None


@in_float32
def log_softmax_backward(g, y, dim):
    return g - y.exp() * g.sum(dim, keepdim=True)  # dx = g − e^y Σ_dim g


class CustomLogSoftmax(nn.LogSoftmax):
    """``nn.LogSoftmax`` computed by ``LogSoftmaxFunction``."""

    function = LogSoftmaxFunction

    def forward(self, x):
        return amp.apply(LogSoftmaxFunction, amp.FP32_ON_CUDA, x, _dim(self, x, "log_softmax"))
