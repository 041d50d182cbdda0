"""Linear, Conv2d and Embedding (a Linear on one-hot inputs): per layer the Function, then its twin."""
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
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        # dx = convᵀ(g; W) (the adjoint of the convolution), dW = x ⋆ g (x correlated with g), db = Σ_{n,h,w} g
        dx = torch.nn.grad.conv2d_input(ctx.shapes[0], W, g, *ctx.conv) if need_x else None
        dW = torch.nn.grad.conv2d_weight(x, ctx.shapes[1], g, *ctx.conv) if need_W else None
        db = g.sum((0, 2, 3)) if need_b else None
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
    function = Conv2dFunction

    def forward(self, x):
        unbatched = x.dim() == 3  # (C, H, W): one image, as a batch of one (as native does)
        x, padding = conv2d_padding(self, x.unsqueeze(0) if unbatched else x)
        y = amp.apply(Conv2dFunction, amp.LOWER, x, self.weight, self.bias,
                      self.stride, padding, self.dilation, self.groups)
        return y.squeeze(0) if unbatched else y


class EmbeddingFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(idx, W, padding_idx, scale_grad_by_freq):
        # y[...] = W[idx[...]]: (...) -> (..., D)
        return W[idx]

    @staticmethod
    def setup_context(ctx, inputs, output):
        idx, W, ctx.padding_idx, ctx.scale_grad_by_freq = inputs
        ctx.save_for_backward(idx)  # W itself is never read back, only its row count
        ctx.num_weights = W.shape[0]

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        idx, g = idx.reshape(-1), g.reshape(-1, g.shape[-1])  # one row of g per index
        # dW[v] = Σ_{n: idx[n] = v} g[n], ÷ count(v) with scale_grad_by_freq; 0 for the padding row (native's choice)
        if ctx.scale_grad_by_freq:
            count = g.new_zeros(ctx.num_weights).index_add(0, idx, torch.ones_like(idx, dtype=g.dtype))
            g = g / count[idx].unsqueeze(1)
        if ctx.padding_idx is not None:
            g = torch.where((idx == ctx.padding_idx).unsqueeze(1), 0, g)
        dW = g.new_zeros(ctx.num_weights, g.shape[1]).index_add(0, idx, g)
        return None, dW, None, None


class CustomEmbedding(nn.Embedding):
    """``nn.Embedding`` computed by ``EmbeddingFunction``; ``max_norm`` renormalizes the looked-up rows in place
    first, as ``F.embedding`` does. ``sparse=True`` is refused: the twin's gradient is always dense."""
    function = EmbeddingFunction

    def forward(self, idx):
        if self.sparse:
            raise NotImplementedError("CustomEmbedding does not support sparse=True (its gradient is dense); "
                                      "use the native layer for this model (layers: {embedding: native})")
        if self.max_norm is not None:
            idx = idx.contiguous()
            with torch.no_grad():
                torch.embedding_renorm_(self.weight, idx, self.max_norm, self.norm_type)
        return amp.apply(EmbeddingFunction, amp.KEEP, idx, self.weight, self.padding_idx, self.scale_grad_by_freq)
