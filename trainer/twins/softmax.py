"""Softmax and LogSoftmax along one dim: math helpers, then the Function, then the twin, one block per op.

Both save only their output y (the next layer keeps it anyway), so their backward is built
from y alone and is itself differentiable: double backward, vmap and compile all work.
Half and bfloat16 inputs are computed in float32 and rounded once, like native "opmath".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.twins import amp, registry
from trainer.twins.amp import as_dtype, opmath
from trainer.twins.registry import Case

def _dim(module: nn.Softmax | nn.LogSoftmax, x: torch.Tensor, name: str) -> int:
    """The module's dim, or native's legacy choice (with its warning, in eager only) when it is None."""
    if module.dim is not None:
        return module.dim
    if torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn; same rule as _get_softmax_dim
        return 0 if x.dim() in (0, 1, 3) else 1
    return F._get_softmax_dim(name, x.dim(), 5)


def _randn(*shape: int, scale: float = 1.0):
    return lambda gen: (scale * torch.randn(*shape, generator=gen, dtype=torch.float64),)


def _values(*rows: list[float]):
    return lambda gen: (torch.tensor(rows, dtype=torch.float64),)


# --- shared math ---------------------------------------------------------------------------

def _shifted(x32: torch.Tensor, dim: int) -> torch.Tensor:
    """x - max_dim(x), a fresh tensor; an all -inf row gives NaN, as native does."""
    if x32.shape[dim] == 0:  # amax refuses an empty dim; the result is empty anyway
        return x32.clone()
    return x32 - x32.amax(dim, keepdim=True)


def log_softmax_forward(x: torch.Tensor, dim: int) -> torch.Tensor:
    # log softmax(x) = z − log Σ e^z with z = x − max x, in that order (as native) so large rows keep precision
    z = _shifted(opmath(x), dim)
    return as_dtype(z.sub_(z.exp().sum(dim, keepdim=True).log_()), x.dtype)


def softmax_forward(x: torch.Tensor, dim: int) -> torch.Tensor:
    # softmax(x) = e^z / Σ e^z with z = x − max x
    e = _shifted(opmath(x), dim).exp_()
    return as_dtype(e.div_(e.sum(dim, keepdim=True)), x.dtype)


def softmax_backward(g: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    # dx = y ⊙ (g − Σ_dim g⊙y), in place on the one fresh buffer g⊙y (addcmul_ has no vmap batching rule)
    y32 = opmath(y)
    gy = opmath(g) * y32
    s = gy.sum(dim, keepdim=True)
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return as_dtype(torch.addcmul(gy, y32, s, value=-1), g.dtype)
    return as_dtype(gy.addcmul_(y32, s, value=-1), g.dtype)


def log_softmax_backward(g: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    # dx = g − e^y Σ_dim g
    g32 = opmath(g)
    return as_dtype(torch.addcmul(g32, opmath(y).exp(), g32.sum(dim, keepdim=True), value=-1), g.dtype)


# --- softmax -------------------------------------------------------------------------------

class SoftmaxFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim):
        return softmax_forward(x, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)  # y only: the backward needs no x

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return softmax_backward(g, y, ctx.dim), None


class CustomSoftmax(nn.Softmax):
    """``nn.Softmax`` computed by ``SoftmaxFunction``."""

    function = SoftmaxFunction

    def forward(self, x):
        return amp.apply(SoftmaxFunction, amp.FP32_ON_CUDA, x, _dim(self, x, "softmax"))


# --- log_softmax ---------------------------------------------------------------------------

class LogSoftmaxFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim):
        return log_softmax_forward(x, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)  # y only: softmax is e^y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return log_softmax_backward(g, y, ctx.dim), None


class CustomLogSoftmax(nn.LogSoftmax):
    """``nn.LogSoftmax`` computed by ``LogSoftmaxFunction``."""

    function = LogSoftmaxFunction

    def forward(self, x):
        return amp.apply(LogSoftmaxFunction, amp.FP32_ON_CUDA, x, _dim(self, x, "log_softmax"))


def _cases(native: type[nn.Module], name: str) -> list[Case]:
    return [
        Case(f"{name}-dim1", lambda: native(dim=1), _randn(4, 7)),
        Case(f"{name}-dim-1-3d", lambda: native(dim=-1), _randn(2, 3, 5)),
        Case(f"{name}-dim-2-3d", lambda: native(dim=-2), _randn(2, 5, 3)),
        Case(f"{name}-dimNone-3d", lambda: native(dim=None), _randn(3, 2, 4)),  # native picks dim 0
        Case(f"{name}-1d", lambda: native(dim=0), _randn(9)),
        Case(f"{name}-large", lambda: native(dim=1), _values([1000.0, 999.0, -1000.0, 0.0],
                                                             [-500.0, -501.0, -499.0, -1e4]), gradcheck=False),
        Case(f"{name}-wide-range", lambda: native(dim=-1), _randn(3, 50, scale=30.0), gradcheck=False),
        Case(f"{name}-inf", lambda: native(dim=1), _values([float("-inf"), 0.0, 1.0],
                                                           [float("-inf"), float("-inf"), float("-inf")]),
             gradcheck=False),
        Case(f"{name}-empty", lambda: native(dim=1), lambda gen: (torch.zeros(0, 4, dtype=torch.float64),),
             gradcheck=False),
    ]


registry.register("softmax", native=nn.Softmax, custom=CustomSoftmax, saves="y (output)", reduction=True,
                cases=lambda: _cases(nn.Softmax, "softmax"))
registry.register("log_softmax", native=nn.LogSoftmax, custom=CustomLogSoftmax, saves="y (output)",
                reduction=True, cases=lambda: _cases(nn.LogSoftmax, "log_softmax"))
