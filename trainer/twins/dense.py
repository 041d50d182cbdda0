"""Linear and Conv2d: math helpers, then the Function, then the twin, one block per op."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.twins import amp, registry
from trainer.twins.registry import Case


def _randn(*shape: int):
    """Standard-normal float64 samples of ``shape`` (linear and conv have no kinks)."""
    return lambda gen: (torch.randn(*shape, generator=gen, dtype=torch.float64),)


# --- linear -----------------------------------------------------------------------------

def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix of its last-dim rows: (..., n) -> (prod(...), n); a 1-D ``t`` is one row."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # not flatten: vmap has no rule for it


def linear_forward(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # y = x Wᵀ + b on rows of x: (..., in) -> (..., out); addmm fuses the bias like native
    x2 = x if x.dim() == 2 else _rows(x)
    y2 = x2.mm(W.t()) if b is None else torch.addmm(b, x2, W.t())
    return y2 if x.dim() == 2 else y2.reshape(*x.shape[:-1], W.shape[0])


def linear_backward(g: torch.Tensor, x: torch.Tensor | None, W: torch.Tensor | None,
                    needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    # dx = g W, dW = g₂ᵀ x₂ (leading dims flattened), db = Σ_leading g
    g2 = g if g.dim() == 2 else _rows(g)
    dx = g.matmul(W) if needs[0] else None
    dW = g2.t().mm(x if x.dim() == 2 else _rows(x)) if needs[1] else None
    db = g2.sum(0) if needs[2] else None
    return dx, dW, db


class LinearFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, W, b):
        return linear_forward(x, W, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, W, _ = inputs
        need_x, need_W, _ = ctx.needs_input_grad
        # dx reads only W and dW only x: keep just what the requested grads need
        ctx.save_for_backward(x if need_W else None, W if need_x else None)

    @staticmethod
    def backward(ctx, g):
        # dx = g W, dW = g₂ᵀ x₂, db = Σ_leading g (see linear_backward)
        x, W = ctx.saved_tensors
        return linear_backward(g, x, W, ctx.needs_input_grad)


class CustomLinear(nn.Linear):
    """``nn.Linear`` computed by ``LinearFunction``; runs in the autocast dtype like native."""

    function = LinearFunction

    def forward(self, x):
        return amp.apply(LinearFunction, amp.LOWER, x, self.weight, self.bias)


registry.register(
    "linear", native=nn.Linear, custom=CustomLinear, saves="x if dW is needed, W if dx is needed",
    reduction=True,
    cases=lambda: [
        Case("linear-1d", lambda: nn.Linear(4, 3), _randn(4)),
        Case("linear-3d", lambda: nn.Linear(3, 2), _randn(2, 3, 3)),
        Case("linear-nobias", lambda: nn.Linear(4, 3, bias=False), _randn(5, 4)),
        Case("linear-wide", lambda: nn.Linear(16, 8), _randn(3, 2, 16)),  # fast-mode gradcheck
    ],
)


# --- conv2d -----------------------------------------------------------------------------

def conv2d_output_padding(x_shape: torch.Size, g_shape: torch.Size, W_shape: torch.Size,
                          stride: tuple[int, int], padding: tuple[int, int],
                          dilation: tuple[int, int]) -> tuple[int, int]:
    """The trailing rows/cols of x that a strided convolution never reads, so its adjoint must restore them."""
    return tuple(
        x_shape[-2 + i] - ((g_shape[-2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (W_shape[2 + i] - 1) + 1)
        for i in range(2)
    )


def conv2d_backward(g: torch.Tensor, x: torch.Tensor | None, W: torch.Tensor | None,
                    x_shape: torch.Size, W_shape: torch.Size, stride: tuple[int, int],
                    padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                    needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    # dx = convᵀ(g; W) (the adjoint of the convolution), dW = x ⋆ g (correlation of x with g), db = Σ_{n,h,w} g
    unbatched = len(x_shape) == 3
    g4 = g.unsqueeze(0) if unbatched else g  # (N, O, oh, ow)
    x4 = x.unsqueeze(0) if unbatched and x is not None else x
    dx = dW = db = None
    if needs[0] and needs[1]:
        # ATen's kernels behind torch.nn.grad.conv2d_input and conv2d_weight, and db, in one call
        dx, dW, db = torch.ops.aten.convolution_backward(
            g4, x4, W, [W_shape[0]], stride, padding, dilation, False, (0, 0), groups, (True, True, needs[2]))
        return dx.squeeze(0) if unbatched else dx, dW, db
    if needs[0]:
        out_pad = conv2d_output_padding(x_shape, g.shape, W_shape, stride, padding, dilation)
        dx = F.conv_transpose2d(g, W, None, stride, padding, out_pad, groups, dilation)
    elif needs[1]:
        dW = torch.nn.grad.conv2d_weight(x4, W_shape, g4, stride, padding, dilation, groups)
    if needs[2]:
        db = g4.sum((0, 2, 3))
    return dx, dW, db


class Conv2dFunction(torch.autograd.Function):
    """``F.conv2d`` forward; the backward spelled out in conv2d_backward.

    When x and W both need grads (training), dx and dW come from one call of
    ``aten.convolution_backward``, the kernel that ``torch.nn.grad.conv2d_input`` and
    ``conv2d_weight`` wrap: measured on CPU (CPU time, 25 interleaved rounds) at 1.00-1.04x
    native, where ``conv_transpose2d`` for dx plus a separate dW call was 1.02-1.12x and
    an explicit ``conv2d`` over (C, N, H, W)-transposed tensors for dW 1.2-4x. With a
    frozen W, dx is ``conv_transpose2d`` (``torch.nn.grad.conv2d_input``'s stride-0
    stand-in input picks a kernel up to 2x slower); with x not needing grad, dW is
    ``torch.nn.grad.conv2d_weight``. All are differentiable, so double backward works.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, W, b, stride, padding, dilation, groups):
        return F.conv2d(x, W, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, W, _, stride, padding, dilation, groups = inputs
        need_x, need_W = ctx.needs_input_grad[:2]
        # dx reads only W (and x's shape), dW only x
        ctx.save_for_backward(x if need_W else None, W if need_x else None)
        ctx.x_shape, ctx.W_shape = x.shape, W.shape
        ctx.conv = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        # dx = convᵀ(g; W), dW = x ⋆ g, db = Σ_{n,h,w} g (see conv2d_backward)
        x, W = ctx.saved_tensors
        grads = conv2d_backward(g, x, W, ctx.x_shape, ctx.W_shape, *ctx.conv, ctx.needs_input_grad[:3])
        return *grads, None, None, None, None


def conv2d_padding(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """``x`` padded as native pads it before the convolution, and the symmetric zero padding left to it.

    ``padding_mode != 'zeros'`` pads x first (as ``nn.Conv2d._conv_forward`` does);
    ``'same'`` with an odd total padding puts the extra zero row/col on the bottom/right
    (as ATen's ``_convolution_mode`` does); ``'valid'`` is no padding.
    """
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)
    if conv.padding == "valid":
        return x, (0, 0)
    if conv.padding != "same":
        return x, tuple(conv.padding)
    left_w, right_w, left_h, right_h = conv._reversed_padding_repeated_twice
    if (left_w, left_h) == (right_w, right_h):
        return x, (left_h, left_w)
    return F.pad(x, (0, right_w - left_w, 0, right_h - left_h)), (left_h, left_w)


class CustomConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed by ``Conv2dFunction``; runs in the autocast dtype like native."""

    function = Conv2dFunction

    def forward(self, x):
        x, padding = conv2d_padding(self, x)
        return amp.apply(Conv2dFunction, amp.LOWER, x, self.weight, self.bias,
                         self.stride, padding, self.dilation, self.groups)


registry.register(
    "conv2d", native=nn.Conv2d, custom=CustomConv2d, saves="x if dW is needed, W if dx is needed",
    reduction=True,
    cases=lambda: [
        Case("conv2d-stride2", lambda: nn.Conv2d(1, 2, 2, stride=2), _randn(1, 1, 5, 5)),  # last row/col unread
        Case("conv2d-same-dilation2", lambda: nn.Conv2d(1, 1, 3, padding="same", dilation=2), _randn(1, 1, 4, 4)),
        Case("conv2d-same-even-kernel", lambda: nn.Conv2d(1, 1, (2, 3), padding="same"), _randn(1, 1, 4, 5)),
        Case("conv2d-valid", lambda: nn.Conv2d(1, 2, 2, padding="valid"), _randn(1, 1, 3, 3)),
        Case("conv2d-groups2", lambda: nn.Conv2d(4, 2, 1, groups=2), _randn(1, 4, 2, 2)),
        Case("conv2d-depthwise", lambda: nn.Conv2d(2, 2, 2, padding=1, groups=2), _randn(1, 2, 3, 3)),
        Case("conv2d-nobias", lambda: nn.Conv2d(1, 2, 2, bias=False), _randn(2, 1, 3, 3)),
        Case("conv2d-reflect", lambda: nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), _randn(1, 1, 3, 4)),
        Case("conv2d-circular", lambda: nn.Conv2d(1, 1, 3, padding=(1, 2), padding_mode="circular"),
             _randn(1, 1, 4, 4)),
        Case("conv2d-unbatched", lambda: nn.Conv2d(1, 2, 2), _randn(1, 4, 4)),
        Case("conv2d-tuples", lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                                                groups=2), _randn(2, 4, 7, 6)),  # fast-mode gradcheck
    ],
)
