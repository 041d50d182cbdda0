"""Softmax and LogSoftmax along one dim: the Function, then its twin. Both save only their output y (the next
layer keeps it anyway): their derivative is a function of y alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.twins import amp
from trainer.twins.amp import in_float32, opmath


def _dim(module: nn.Softmax | nn.LogSoftmax, x: torch.Tensor, name: str) -> int:
    """The module's dim, or native's legacy choice (with its warning, in eager only) when it is None."""
    if module.dim is not None:
        return module.dim
    if torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn; same rule as _get_softmax_dim
        return 0 if x.dim() in (0, 1, 3) else 1
    return F._get_softmax_dim(name, x.dim(), 5)


class SoftmaxFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x, dim):
        e = (x - x.amax(dim, keepdim=True)).exp()  # y = e^z / Σ e^z with z = x − max x (no overflow)
        return e / e.sum(dim, keepdim=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        y, g = opmath(ctx.saved_tensors[0]), opmath(g)
        return y * (g - (g * y).sum(ctx.dim, keepdim=True)), None  # dx = y ⊙ (g − Σ_dim g ⊙ y)


class CustomSoftmax(nn.Softmax):
    function = SoftmaxFunction

    def forward(self, x):
        return amp.apply(SoftmaxFunction, amp.FP32_ON_CUDA, x, _dim(self, x, "softmax"))


class LogSoftmaxFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x, dim):
        # y = z − log Σ e^z with z = x − max x: no overflow, and (as native) large rows keep precision
        z = x - x.amax(dim, keepdim=True)
        return z - z.exp().sum(dim, keepdim=True).log()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)  # softmax is e^y

    @staticmethod
    def backward(ctx, g):
        y, g = opmath(ctx.saved_tensors[0]), opmath(g)
        return g - y.exp() * g.sum(ctx.dim, keepdim=True), None  # dx = g − e^y Σ_dim g


class CustomLogSoftmax(nn.LogSoftmax):
    function = LogSoftmaxFunction

    def forward(self, x):
        return amp.apply(LogSoftmaxFunction, amp.FP32_ON_CUDA, x, _dim(self, x, "log_softmax"))
