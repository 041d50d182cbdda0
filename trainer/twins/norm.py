"""Normalization: LayerNorm and BatchNorm1d/2d, each as the Function, then the twin.

Both Functions return their statistics beside ``y``, as ``torch.native_layer_norm`` and
``native_batch_norm`` do: batch norm's module updates its running stats from them, and
backward saves them. Being outputs, not hidden intermediates, they carry x's history, so
double backward is exact: each backward adds the terms their own grads bring (the tutorial
``Sinh``). Half and bfloat16 are normalized in float32, with float32 statistics, as native.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.twins import amp
from trainer.twins.amp import as_dtype, opmath

# --- layer_norm ---------------------------------------------------------------------------


class LayerNormFunction(torch.autograd.Function):
    """LayerNorm over the last ``ndim`` dims, returning ``(y, mean, rstd)`` (statistics with those dims kept as 1)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, ndim, eps):
        # y = γ x̂ + β with x̂ = (x − μ) / sqrt(σ² + eps), μ and σ² (biased) over the normalized dims
        var, mean = torch.var_mean(opmath(x), tuple(range(-ndim, 0)), correction=0, keepdim=True)
        rstd = (var + eps).rsqrt()
        y = (opmath(x) - mean) * rstd
        y = y if weight is None else y * weight
        y = y if bias is None else y + bias
        return y.to(x.dtype), mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, ctx.ndim, _ = inputs
        ctx.save_for_backward(x, weight, *output[1:])  # as native: x, mean, rstd
        ctx.dtypes = x.dtype, getattr(weight, "dtype", None), getattr(bias, "dtype", None)
        ctx.set_materialize_grads(False)  # the statistics get a grad only in double backward: None, not zeros

    @staticmethod
    def backward(ctx, g, g_mean, g_rstd):
        x, w, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dims, batch = tuple(range(-ctx.ndim, 0)), tuple(range(x.dim() - ctx.ndim))
        D = math.prod(x.shape[-ctx.ndim:])
        x_hat = (opmath(x) - mean) * rstd
        g = torch.zeros_like(x_hat) if g is None else opmath(g)
        gh = g if w is None else g * w
        # dx = rstd (ĝ − mean(ĝ) − x̂ mean(ĝ x̂)) with ĝ = g γ; dγ = Σ_batch g x̂; dβ = Σ_batch g
        dx = rstd * (gh - gh.mean(dims, keepdim=True) - x_hat * (gh * x_hat).mean(dims, keepdim=True))
        # plus the statistics' own grads (double backward): dμ/dx = 1/D, d rstd/dx = −rstd² x̂ / D
        dx = dx if g_mean is None else dx + g_mean / D
        dx = dx if g_rstd is None else dx - g_rstd * rstd * rstd * x_hat / D
        dw = (g * x_hat).sum(batch) if need_w else None
        db = g.sum(batch) if need_b else None
        return *(as_dtype(t, dtype) for t, dtype in zip((dx if need_x else None, dw, db), ctx.dtypes)), None, None


class CustomLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed by ``LayerNormFunction``."""

    function = LayerNormFunction

    def forward(self, x):
        k = len(self.normalized_shape)
        if x.shape[-k:] != self.normalized_shape:       # a shorter x gives a shorter slice: a mismatch too
            raise RuntimeError(f"Given normalized_shape={list(self.normalized_shape)}, expected input with shape "
                               f"[*, {', '.join(map(str, self.normalized_shape))}], but got input of size{x.shape}")
        y, _, _ = amp.apply(LayerNormFunction, amp.FP32_ON_CUDA, x, self.weight, self.bias, k, self.eps)
        return y


# --- batch_norm ---------------------------------------------------------------------------


def _channels(ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(every dim but the channel dim 1, the shape of a per-channel tensor broadcasting over them) for ndim dims."""
    return (0, *range(2, ndim)), (1, -1, *[1] * (ndim - 2))


class BatchNormFunction(torch.autograd.Function):
    """Batch norm over all dims but 1 with the batch statistics, returning ``(y, mean, var)`` (biased var, dims
    other than 1 kept as 1); or, given ``running_mean`` and ``running_var`` (eval), with those: ``(y, None, None)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, eps):
        dims, shape = _channels(x.dim())
        if running_mean is None:
            var, mean = torch.var_mean(opmath(x), dims, correction=0, keepdim=True)
        else:
            mean, var = running_mean.view(shape), running_var.view(shape)
        # y = γ x̂ + β with x̂ = (x − μ) / sqrt(σ² + eps), per channel
        y = (opmath(x) - mean) * (var + eps).rsqrt()
        y = y if weight is None else y * weight.view(shape)
        y = y if bias is None else y + bias.view(shape)
        return (y.to(x.dtype), mean, var) if running_mean is None else (y.to(x.dtype), None, None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, running_mean, running_var, ctx.eps = inputs
        ctx.train = running_mean is None
        if ctx.train:  # as native: x and the batch statistics
            ctx.save_for_backward(x, weight, *output[1:])
        else:          # the running stats (constants); x only for dγ
            ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, running_mean, running_var)
        ctx.dtypes = x.dtype, getattr(weight, "dtype", None), getattr(bias, "dtype", None)
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)  # the statistics get a grad only in double backward: None, not zeros

    @staticmethod
    def backward(ctx, g, g_mean, g_var):
        x, w, mean, var = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dims, shape = _channels(len(ctx.x_shape))
        rstd = (var.view(shape) + ctx.eps).rsqrt()
        x_hat = None if x is None else (opmath(x) - mean.view(shape)) * rstd
        g = rstd.new_zeros(ctx.x_shape) if g is None else opmath(g)
        k = rstd if w is None else rstd * w.view(shape)
        if ctx.train:
            # dx = γ rstd (g − mean(g) − x̂ mean(g x̂)), means over all dims but 1
            dx = k * (g - g.mean(dims, keepdim=True) - x_hat * (g * x_hat).mean(dims, keepdim=True))
            # plus the statistics' own grads (double backward): dμ/dx = 1/M, dσ²/dx = 2 (x − μ) / M
            M = g.numel() // g.shape[1]
            dx = dx if g_mean is None else dx + g_mean / M
            dx = dx if g_var is None else dx + g_var * 2 * x_hat / (rstd * M)
        else:
            dx = g * k  # dx = γ g / sqrt(running var + eps): the running statistics are constants
        dw = (g * x_hat).sum(dims) if need_w else None  # dγ = Σ g x̂
        db = g.sum(dims) if need_b else None            # dβ = Σ g
        grads = (as_dtype(t, dtype) for t, dtype in zip((dx if need_x else None, dw, db), ctx.dtypes))
        return *grads, None, None, None


class _BatchNormTwin:
    """``forward`` of the batch-norm twins: ``nn.modules.batchnorm._BatchNorm.forward`` with the Function."""

    function = BatchNormFunction

    def forward(self, x):
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # like native: the running stats are used in eval, updated in training if tracked
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        n = x.numel() // x.size(1)
        if batch_stats and n == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        y, mean, var = amp.apply(BatchNormFunction, amp.KEEP, x, self.weight, self.bias,
                                 None if batch_stats else running_mean, None if batch_stats else running_var,
                                 self.eps)
        if batch_stats and running_mean is not None:
            with torch.no_grad():  # running = (1 − m) running + m batch, with the unbiased batch variance
                running_mean.mul_(1 - factor).add_(mean.flatten(), alpha=factor)
                running_var.mul_(1 - factor).add_(var.flatten() * (n / (n - 1)), alpha=factor)
        return y


class CustomBatchNorm1d(_BatchNormTwin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` computed by ``BatchNormFunction``."""


class CustomBatchNorm2d(_BatchNormTwin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` computed by ``BatchNormFunction``."""
