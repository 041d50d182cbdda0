"""Embedding: the math helper, then the Function, then the twin."""
from __future__ import annotations

import torch
from torch import nn

from trainer.twins import amp, registry
from trainer.twins.registry import Case


def embedding_backward(g: torch.Tensor, idx: torch.Tensor, num_weights: int, padding_idx: int | None,
                       scale_grad_by_freq: bool) -> torch.Tensor:
    # dW[v] = Σ_{n: idx[n]=v} g[n] (÷ count(v) with scale_grad_by_freq); dW[padding_idx] = 0
    idx = idx.reshape(-1)
    g2 = g.reshape(idx.shape[0], g.shape[-1])  # (N, D) rows, one per index
    if scale_grad_by_freq:
        counts = torch.zeros(num_weights, dtype=g.dtype, device=g.device).index_add(
            0, idx, torch.ones(idx.shape, dtype=g.dtype, device=g.device))
        g2 = g2 / counts[idx].unsqueeze(1)
    dW = torch.zeros(num_weights, g.shape[-1], dtype=g.dtype, device=g.device).index_add(0, idx, g2)
    if padding_idx is not None:
        dW[padding_idx] = 0  # dW is ours, not an incoming grad: zeroing one row in place is O(D)
    return dW


class EmbeddingFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(idx, W, padding_idx, scale_grad_by_freq):
        # y[...] = W[idx[...]]: (...) -> (..., D)
        return W.index_select(0, idx.reshape(-1)).reshape(*idx.shape, W.shape[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        idx, W, padding_idx, scale_grad_by_freq = inputs
        ctx.save_for_backward(idx)  # W itself is never read back, only its row count
        ctx.num_weights = W.shape[0]
        ctx.padding_idx, ctx.scale_grad_by_freq = padding_idx, scale_grad_by_freq

    @staticmethod
    def backward(ctx, g):
        # dW = zeros.index_add(0, idx, g rows), padding row zeroed; indices get no grad
        (idx,) = ctx.saved_tensors
        return None, embedding_backward(g, idx, ctx.num_weights, ctx.padding_idx, ctx.scale_grad_by_freq), None, None


class CustomEmbedding(nn.Embedding):
    """``nn.Embedding`` computed by ``EmbeddingFunction``; keeps the weight dtype under autocast like native.

    ``padding_idx``, ``max_norm`` (the same in-place renorm of the looked-up rows before
    the lookup that ``F.embedding`` does) and ``scale_grad_by_freq`` match native.
    ``sparse=True`` is refused: the twin's gradient is always dense.
    """

    function = EmbeddingFunction

    def forward(self, idx):
        if self.sparse:
            raise NotImplementedError(
                "CustomEmbedding does not support sparse=True (its gradient is dense); "
                "use the native layer for this model (layers: {embedding: native})")
        if self.max_norm is not None:
            idx = idx.contiguous()
            with torch.no_grad():
                torch.embedding_renorm_(self.weight, idx, self.max_norm, self.norm_type)
        return amp.apply(EmbeddingFunction, amp.KEEP, idx, self.weight, self.padding_idx, self.scale_grad_by_freq)


def _indices(*rows):
    """``torch.tensor(rows)``: fixed indices, so repeats and padding-row hits are chosen, not drawn."""
    return lambda gen: (torch.tensor(rows),)


registry.register(
    "embedding", native=nn.Embedding, custom=CustomEmbedding, saves="indices",
    cases=lambda: [
        Case("embedding", lambda: nn.Embedding(5, 3), _indices([0, 2, 2], [4, 1, 2])),
        Case("embedding-1d-indices", lambda: nn.Embedding(4, 2), _indices(3, 3, 0)),
        Case("embedding-padding-unused", lambda: nn.Embedding(5, 3, padding_idx=1), _indices([0, 2, 2], [4, 3, 2])),
        # native's grads below are not the forward's derivative (the padding row's is 0 though the
        # forward reads it), so these are compared with native only
        Case("embedding-padding", lambda: nn.Embedding(5, 3, padding_idx=1), _indices([1, 2, 1], [4, 1, 2]),
             gradcheck=False),
        Case("embedding-padding-negative", lambda: nn.Embedding(5, 3, padding_idx=-1), _indices([4, 0, 4, 3]),
             gradcheck=False),
        Case("embedding-scale-grad-by-freq", lambda: nn.Embedding(5, 3, padding_idx=0, scale_grad_by_freq=True),
             _indices([0, 2, 2], [4, 2, 0]), gradcheck=False),
        Case("embedding-max-norm", lambda: nn.Embedding(5, 3, max_norm=1.0), _indices([0, 2, 2], [4, 1, 2]),
             gradcheck=False),
    ],
)
