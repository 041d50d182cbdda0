"""LayerNorm and BatchNorm1d/2d: the Function, then its twin. Both return their statistics beside y, as native's
kernels do: outputs, not hidden intermediates, so double backward is exact (each backward adds the statistics' own
grads' terms). Half types are normalized in float32, with float32 statistics, as native; autograd rounds each
grad to its input's dtype."""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.twins import amp
from trainer.twins.amp import opmath


def _centered(gh: torch.Tensor, x_hat: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """ĝ − mean(ĝ) − x̂ mean(ĝ x̂), means over ``dims``: a normalization's dx before its rstd factor."""
    return gh - gh.mean(dims, keepdim=True) - x_hat * (gh * x_hat).mean(dims, keepdim=True)


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
        ctx.set_materialize_grads(False)  # the statistics get a grad only in double backward: None, not zeros

    @staticmethod
    def backward(ctx, g, g_mean, g_rstd):
        x, w, mean, rstd = ctx.saved_tensors
        dims, batch = tuple(range(-ctx.ndim, 0)), tuple(range(x.dim() - ctx.ndim))
        D = math.prod(x.shape[-ctx.ndim:])
        x_hat = (opmath(x) - mean) * rstd
        g = torch.zeros_like(x_hat) if g is None else opmath(g)
        # dx = rstd (ĝ − mean(ĝ) − x̂ mean(ĝ x̂)) with ĝ = g γ; dγ = Σ_batch g x̂; dβ = Σ_batch g
        dx = rstd * _centered(g if w is None else g * w, x_hat, dims)
        # plus the statistics' own grads (double backward): dμ/dx = 1/D, d rstd/dx = −rstd² x̂ / D
        dx = dx if g_mean is None else dx + g_mean / D
        dx = dx if g_rstd is None else dx - g_rstd * rstd * rstd * x_hat / D
        dw = (g * x_hat).sum(batch) if ctx.needs_input_grad[1] else None
        db = g.sum(batch) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


class CustomLayerNorm(nn.LayerNorm):
    function = LayerNormFunction

    def forward(self, x):
        k = len(self.normalized_shape)
        if x.shape[-k:] != self.normalized_shape:       # a shorter x gives a shorter slice: a mismatch too
            raise RuntimeError(f"Given normalized_shape={list(self.normalized_shape)}, expected input with shape "
                               f"[*, {', '.join(map(str, self.normalized_shape))}], but got input of size{x.shape}")
        return amp.apply(LayerNormFunction, amp.FP32_ON_CUDA, x, self.weight, self.bias, k, self.eps)[0]


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
        ctx.train, ctx.x_shape = running_mean is None, x.shape
        # as native: x and the batch statistics; in eval the running stats (constants), and x only for dγ
        stats = output[1:] if ctx.train else (running_mean, running_var)
        ctx.save_for_backward(x if ctx.train or ctx.needs_input_grad[1] else None, weight, *stats)
        ctx.set_materialize_grads(False)  # the statistics get a grad only in double backward: None, not zeros

    @staticmethod
    def backward(ctx, g, g_mean, g_var):
        x, w, mean, var = ctx.saved_tensors
        dims, shape = _channels(len(ctx.x_shape))
        rstd = (var.view(shape) + ctx.eps).rsqrt()
        x_hat = None if x is None else (opmath(x) - mean.view(shape)) * rstd
        g = rstd.new_zeros(ctx.x_shape) if g is None else opmath(g)
        # train: dx = γ rstd (g − mean(g) − x̂ mean(g x̂)), means over all dims but 1; eval: dx = γ rstd g
        dx = (rstd if w is None else rstd * w.view(shape)) * (_centered(g, x_hat, dims) if ctx.train else g)
        # plus the batch statistics' own grads (double backward): dμ/dx = 1/M, dσ²/dx = 2 (x − μ) / M
        M = g.numel() // g.shape[1]
        dx = dx if g_mean is None else dx + g_mean / M
        dx = dx if g_var is None else dx + g_var * 2 * x_hat / (rstd * M)
        dw = (g * x_hat).sum(dims) if ctx.needs_input_grad[1] else None  # dγ = Σ g x̂
        db = g.sum(dims) if ctx.needs_input_grad[2] else None            # dβ = Σ g
        return dx, dw, db, None, None, None


class _BatchNormTwin:
    """``forward`` of the batch-norm twins: ``nn.modules.batchnorm._BatchNorm.forward`` with the Function."""
    function = BatchNormFunction

    def forward(self, x):
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # like native: batch statistics in training or without running stats, else the running stats
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        n = x.numel() // x.size(1)
        if batch_stats and n == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        running = (None, None) if batch_stats else (self.running_mean, self.running_var)
        y, mean, var = amp.apply(BatchNormFunction, amp.KEEP, x, self.weight, self.bias, *running, self.eps)
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():  # running = (1 − m) running + m batch, with the unbiased batch variance
                self.running_mean.mul_(1 - factor).add_(mean.flatten(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.flatten() * (n / (n - 1)), alpha=factor)
        return y


class CustomBatchNorm1d(_BatchNormTwin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` computed by ``BatchNormFunction``."""


class CustomBatchNorm2d(_BatchNormTwin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` computed by ``BatchNormFunction``."""
