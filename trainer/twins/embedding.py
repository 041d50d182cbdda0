"""Embedding: the Function, then the twin."""
from __future__ import annotations

import torch
from torch import nn

from trainer.twins import amp


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
