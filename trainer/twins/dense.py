"""Linear and Conv2d: the Function, then its twin."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.twins import amp


class LinearFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, W, b):
        # y = x Wᵀ + b: (..., in) -> (..., out)
        y = x.matmul(W.t())
        return y if b is None else y + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, W, _ = inputs
        need_x, need_W, _ = ctx.needs_input_grad
        ctx.save_for_backward(x if need_W else None, W if need_x else None)  # dx reads only W, dW only x

    @staticmethod
    def backward(ctx, g):
        x, W = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])  # (rows, out): the leading dims flattened
        # dx = g W, dW = g₂ᵀ x₂, db = Σ_rows g
        dx = g.matmul(W) if need_x else None
        dW = g2.t().matmul(x.reshape(-1, x.shape[-1])) if need_W else None
        db = g2.sum(0) if need_b else None
        return dx, dW, db


class CustomLinear(nn.Linear):
    """``nn.Linear`` computed by ``LinearFunction``; runs in the autocast dtype like native."""
    function = LinearFunction

    def forward(self, x):
        return amp.apply(LinearFunction, amp.LOWER, x, self.weight, self.bias)


class Conv2dFunction(torch.autograd.Function):
    """``y = W ⋆ x + b`` on batched (N, C, H, W) inputs, zero-padded symmetrically."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, W, b, stride, padding, dilation, groups):
        return F.conv2d(x, W, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, W, _, *ctx.conv = inputs
        need_x, need_W, _ = ctx.needs_input_grad[:3]
        ctx.save_for_backward(x if need_W else None, W if need_x else None)  # dx reads only W, dW only x
        ctx.shapes = x.shape, W.shape

    @staticmethod
    def backward(ctx, g):
        x, W = ctx.saved_tensors
        # what a grad not asked for would read is only a shape (as in torch.nn.grad.conv2d_input)
        x = g.new_empty(1).expand(ctx.shapes[0]) if x is None else x
        W = g.new_empty(1).expand(ctx.shapes[1]) if W is None else W
        # dx = convᵀ(g; W) (the adjoint of the convolution), dW = x ⋆ g (x correlated with g), db = Σ_{n,h,w} g,
        # by ATen's convolution_backward, the op behind torch.nn.grad.conv2d_input and conv2d_weight
        stride, padding, dilation, groups = ctx.conv
        dx, dW, db = torch.ops.aten.convolution_backward(g, x, W, [W.shape[0]], stride, padding, dilation,
                                                         False, [0, 0], groups, ctx.needs_input_grad[:3])
        return dx, dW, db, None, None, None, None


def conv2d_padding(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """``x`` padded as native pads it (``padding_mode``, or 'same' with an odd total: the extra zero row/col at the
    bottom/right, as ATen's ``_convolution_mode``), and the symmetric zero padding left to the convolution."""
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
        unbatched = x.dim() == 3  # (C, H, W): one image, as a batch of one (as native does)
        x, padding = conv2d_padding(self, x.unsqueeze(0) if unbatched else x)
        y = amp.apply(Conv2dFunction, amp.LOWER, x, self.weight, self.bias,
                      self.stride, padding, self.dilation, self.groups)
        return y.squeeze(0) if unbatched else y
