"""Normalization: LayerNorm and BatchNorm1d/2d, each as math helpers, the Function, then the twin.

Both Functions return their statistics beside ``y``. Batch norm's module needs them to
update its running stats; and because they are outputs (whose grad_fn is the Function)
rather than hidden intermediates, backward may use them and double backward still
reaches ``x`` through them (custom-functions.md section 1, the tutorial ``Sinh``).
Statistics are kept in "opmath", float32 for half/bfloat16 inputs, as native kernels do.

Each backward has two forms of one formula. A first-order backward records no graph, so
it runs ``*_backward_fused``: dx as ``a g + b x + c`` with per-row/per-channel a, b, c
(the native CPU kernels' arrangement), one temporary, in-place updates of fresh buffers.
Double backward and torch.func record the backward, so they run the plain
``*_backward``, whose every op autograd can differentiate.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer import layers
from trainer.functions import amp
from trainer.layers import Case


def _opmath(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype native kernels compute in: float32 for half types, else its own."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _randn(*shape: int, scale: float = 1.0, shift: float = 0.0):
    def make(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift,)
    return make


# --- layer_norm ---------------------------------------------------------------------------

def layer_norm_forward(x, weight, bias, ndim: int, eps: float):
    """``(y, mean, rstd)`` over the last ``ndim`` dims; the stats keep those dims with size 1."""
    dims = tuple(range(-ndim, 0))
    xf = _opmath(x)
    mean = xf.mean(dims, keepdim=True)
    y = xf - mean                                         # two-pass variance; the norm needs no temporary
    var = torch.linalg.vector_norm(y, dim=dims, keepdim=True).square() / math.prod(x.shape[-ndim:])
    rstd = (var + eps).rsqrt()
    y.mul_(rstd)                                          # in place is safe: forward records no graph
    if weight is not None:
        y.mul_(weight)
    if bias is not None:
        y.add_(bias)
    return y.to(x.dtype), mean, rstd


def layer_norm_backward(g, x_hat, rstd, weight, ndim: int, needs):
    """Grads of (x, weight, bias) from ``g``, the grad of y (opmath), in differentiable ops."""
    dims, batch = tuple(range(-ndim, 0)), tuple(range(x_hat.dim() - ndim))
    dx = dw = db = None
    if needs[0]:
        gh = g * weight if weight is not None else g     # g_hat = g * gamma
        # dx = rstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat))
        dx = rstd * (gh - gh.mean(dims, keepdim=True) - x_hat * (gh * x_hat).mean(dims, keepdim=True))
    if needs[1] and weight is not None:
        dw = (g * x_hat).sum(batch)                       # d gamma = sum_batch g * x_hat
    if needs[2]:
        db = g.sum(batch)                                 # d beta = sum_batch g
    return dx, dw, db


def layer_norm_backward_fused(g, src, mean, rstd, weight, ndim: int, src_is_x_hat: bool, needs):
    """``layer_norm_backward`` for a backward that records no graph; ``src`` is x, or y when it is x_hat.

    One temporary, ``g * x_hat`` (x_hat built per element as native does, ``rstd x -
    rstd mu``), and in-place updates of fresh buffers computed from g only, so vmap
    over grads still works.
    """
    D = math.prod(src.shape[-ndim:])
    g2, s2, r = g.reshape(-1, D), _opmath(src).reshape(-1, D), rstd.view(-1, 1)
    w = weight.reshape(D) if weight is not None else None
    dx = dw = db = None
    if needs[0] or (needs[1] and w is not None):
        gx = g2 * s2
        if not src_is_x_hat:
            mu = mean.view(-1, 1)
            gx.mul_(r).addcmul_(g2, -mu * r)              # g * x_hat
        if needs[1] and w is not None:
            dw = gx.sum(0).view(weight.shape)             # d gamma = sum_batch g * x_hat
        if needs[0]:
            sum_g = (g2 @ w if w is not None else g2.sum(1)).unsqueeze(1)       # sum_j g_hat, per row
            sum_gx = (gx @ w if w is not None else gx.sum(1)).unsqueeze(1)     # sum_j g_hat * x_hat
            del gx
            # dx = rstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat)), as k src + c + g_hat
            k = sum_gx / -D if src_is_x_hat else -r * sum_gx / D
            c = sum_g / -D if src_is_x_hat else sum_g / -D - k * mu
            dx = (s2 * k).add_(c)
            dx = (dx.addcmul_(g2, w) if w is not None else dx.add_(g2)).mul_(r).view(src.shape)
    if needs[2]:
        db = g2.sum(0).view(src.shape[-ndim:])            # d beta = sum_batch g
    return dx, dw, db


def layer_norm_stats_backward(g_mean, g_rstd, x_hat, rstd, ndim: int) -> torch.Tensor:
    """Grad of x from the grads of the stat outputs (sent only by double backward)."""
    D = math.prod(x_hat.shape[-ndim:])
    dx = torch.zeros_like(x_hat)
    if g_mean is not None:
        dx = dx + g_mean / D                              # d mean/dx = 1/D
    if g_rstd is not None:
        dx = dx - g_rstd * rstd * rstd * x_hat / D        # d rstd/dx = -rstd^3 (x - mu)/D
    return dx


class LayerNormFunction(torch.autograd.Function):
    """LayerNorm over the last ``ndim`` dims, returning ``(y, mean, rstd)``.

    Saves x, mean and rstd, like native. With no affine transform ``x_hat`` *is* ``y``
    (which the next layer keeps anyway), so it then saves y and rstd: less than native,
    though an in-place op on y before backward then raises, as for any saved output.
    Double backward is exact, not once-differentiable: what backward reads has history
    (x is an input, y and the stats are outputs), and the stats' grads are handled.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, ndim, eps):
        return layer_norm_forward(x, weight, bias, ndim, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, ndim, eps = inputs
        y, mean, rstd = output
        ctx.ndim = ndim
        ctx.set_materialize_grads(False)  # the stat outputs usually get no grad: None, not zeros
        # a low-precision y would round x_hat, so then x is kept as native does
        ctx.y_is_x_hat = weight is None and bias is None and y.dtype == rstd.dtype
        ctx.save_for_backward(*((y, weight, None) if ctx.y_is_x_hat else (x, weight, mean)), rstd)
        ctx.dtypes = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)

    @staticmethod
    def backward(ctx, g, g_mean, g_rstd):
        src, weight, mean, rstd = ctx.saved_tensors
        x_hat = None
        if torch.is_grad_enabled() or g_mean is not None or g_rstd is not None:
            x_hat = src if ctx.y_is_x_hat else (_opmath(src) - mean) * rstd
        dx = dw = db = None
        if g is not None and torch.is_grad_enabled():     # recorded: double backward or torch.func
            dx, dw, db = layer_norm_backward(_opmath(g), x_hat, rstd, weight, ctx.ndim, ctx.needs_input_grad)
        elif g is not None:
            dx, dw, db = layer_norm_backward_fused(_opmath(g), src, mean, rstd, weight, ctx.ndim, ctx.y_is_x_hat,
                                                   ctx.needs_input_grad)
        if ctx.needs_input_grad[0] and (g_mean is not None or g_rstd is not None):
            extra = layer_norm_stats_backward(g_mean, g_rstd, x_hat, rstd, ctx.ndim)
            dx = extra if dx is None else dx + extra
        return (*(t.to(dtype) if t is not None else None for t, dtype in zip((dx, dw, db), ctx.dtypes)),
                None, None)


class CustomLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed by ``LayerNormFunction``."""

    function = LayerNormFunction

    def forward(self, x):
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape):
            raise RuntimeError(f"Given normalized_shape={list(self.normalized_shape)}, expected input with shape "
                               f"[*, {', '.join(map(str, self.normalized_shape))}], but got input of size{x.shape}")
        y, _, _ = amp.apply(LayerNormFunction, amp.FP32_ON_CUDA, x, self.weight, self.bias, k, self.eps)
        return y


def _layer_norm(shape, **kwargs):
    """A LayerNorm whose affine parameters are random, so they are not the trivial 1 and 0."""
    def build() -> nn.LayerNorm:
        m = nn.LayerNorm(shape, **kwargs)
        with torch.no_grad():
            if m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
            if m.bias is not None:
                m.bias.normal_()
        return m
    return build


layers.register(
    "layer_norm", native=nn.LayerNorm, custom=CustomLayerNorm, reduction=True,
    saves="x, mean, rstd (stats fp32); y and rstd without affine",
    cases=lambda: [
        Case("last-dim", _layer_norm(5), _randn(3, 5)),
        Case("last-two-dims", _layer_norm((3, 4)), _randn(2, 3, 4)),
        Case("no-affine", _layer_norm(6, elementwise_affine=False), _randn(4, 6)),
        Case("no-bias", _layer_norm(6, bias=False), _randn(3, 6)),
        Case("shifted", _layer_norm(8), _randn(2, 8, scale=0.5, shift=3.0)),
        Case("wide", _layer_norm(96), _randn(2, 5, 96), gradcheck=False),
        Case("wide-no-affine", _layer_norm((4, 24), elementwise_affine=False), _randn(3, 4, 24), gradcheck=False),
    ],
)


# --- batch_norm ---------------------------------------------------------------------------

def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor viewed to broadcast over x's channel dim 1."""
    return t.view(-1, *([1] * (x.dim() - 2)))


def batch_norm_forward(x, weight, bias, running_mean, running_var, eps: float):
    """``(y, mean, var)``: batch stats over all dims but 1, or the running stats when given (eval)."""
    xf = _opmath(x)
    if running_mean is None:
        dims = (0, *range(2, x.dim()))
        mean = xf.mean(dims)
        y = xf - _per_channel(mean, x)                    # two-pass variance, biased
        if x.dim() > 2:                                   # per (n, c) norms: no y * y temporary
            var = torch.linalg.vector_norm(y.reshape(*y.shape[:2], -1), dim=-1).square().sum(0)
        else:
            var = (y * y).sum(0)
        var = var / (x.numel() // x.shape[1])
        alpha = (var + eps).rsqrt()
        if weight is not None:
            alpha = alpha * weight
        y.mul_(_per_channel(alpha, x))                    # in place is safe: forward records no graph
        if bias is not None:
            y.add_(_per_channel(bias, x))
    else:
        mean, var = running_mean.to(xf.dtype, copy=True), running_var.to(xf.dtype, copy=True)
        alpha = (var + eps).rsqrt()
        if weight is not None:
            alpha = alpha * weight
        beta = -mean * alpha + bias if bias is not None else -mean * alpha
        # y = x * alpha + beta per channel, as the native CPU kernel computes it
        y = (xf * _per_channel(alpha, x)).add_(_per_channel(beta, x))
    return y.to(x.dtype), mean, var


def batch_norm_backward(g, x_hat, rstd, weight, train: bool, needs):
    """Grads of (x, weight, bias) from ``g``, the grad of y (opmath), in differentiable ops."""
    dims = (0, *range(2, g.dim()))
    alpha = _per_channel(rstd * weight if weight is not None else rstd, g)
    dx = dw = db = None
    if needs[0] and train:
        # dx = (gamma rstd / M) (M g - sum g - x_hat sum(g x_hat))
        dx = alpha * (g - g.mean(dims, keepdim=True) - x_hat * (g * x_hat).mean(dims, keepdim=True))
    elif needs[0]:
        dx = g * alpha                                    # dx = g gamma / sqrt(running_var + eps)
    if needs[1] and weight is not None:
        dw = (g * x_hat).sum(dims)                        # d gamma = sum g x_hat
    if needs[2]:
        db = g.sum(dims)                                  # d beta = sum g
    return dx, dw, db


def batch_norm_backward_fused(g, src, mean, rstd, weight, train: bool, src_is_x_hat: bool, needs):
    """``batch_norm_backward`` for a backward that records no graph; ``src`` is x, or y when it is x_hat.

    In-place ops write only buffers computed from g, so vmap over grads still works.
    """
    dims = (0, *range(2, g.dim()))
    M = g.numel() // g.shape[1]
    alpha = rstd * weight if weight is not None else rstd
    dx = dw = db = None
    sum_g = g.sum(dims) if needs[2] or (needs[0] and train) else None
    if needs[1] and weight is not None or (needs[0] and train):
        # sum g x_hat = rstd (sum g x - mu sum g): no x_hat temporary (native sums g (x - mu),
        # which cancels less when |mu| >> sigma; both agree to float32 tolerance at |mu| ~ 10 sigma)
        sum_gx = (g * _opmath(src)).sum(dims)
        if not src_is_x_hat:
            sum_gx = (sum_gx - mean * (sum_g if sum_g is not None else g.sum(dims))) * rstd
        if needs[1] and weight is not None:
            dw = sum_gx                                   # d gamma = sum g x_hat
        if needs[0] and train:
            # dx = (gamma rstd / M) (M g - sum g - x_hat sum(g x_hat)) = alpha g + k x + c per channel
            k = -alpha * sum_gx / M * (1 if src_is_x_hat else rstd)
            c = -alpha * sum_g / M - (0 if src_is_x_hat else k * mean)
            dx = (_opmath(src) * _per_channel(k, g)).add_(_per_channel(c, g)).addcmul_(g, _per_channel(alpha, g))
    if needs[0] and not train:
        dx = g * _per_channel(alpha, g)                   # dx = g gamma / sqrt(running_var + eps)
    if needs[2]:
        db = sum_g                                        # d beta = sum g
    return dx, dw, db


def batch_norm_stats_backward(g_mean, g_var, x_hat, rstd) -> torch.Tensor:
    """Grad of x from the grads of the batch-stat outputs (sent only by double backward)."""
    M = x_hat.numel() // x_hat.shape[1]
    dx = torch.zeros_like(x_hat)
    if g_mean is not None:
        dx = dx + _per_channel(g_mean / M, x_hat)         # d mean/dx = 1/M
    if g_var is not None:
        dx = dx + x_hat * _per_channel(2 * g_var / (rstd * M), x_hat)   # d var/dx = 2 (x - mu)/M
    return dx


class BatchNormFunction(torch.autograd.Function):
    """Batch norm over all dims but 1, returning ``(y, mean, var)`` (biased var, opmath dtype).

    With ``running_mean``/``running_var`` given it normalizes with them (eval); otherwise
    with the batch stats, which it returns so the module can update its running stats
    outside the Function. Saves x, mean and var; y instead of x in training without an
    affine transform (y *is* x_hat); in eval the running-stat buffers, and x only if the
    weight needs a grad. Double backward is exact, for the reason given for
    ``LayerNormFunction`` (in eval the stats are constants).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, eps):
        return batch_norm_forward(x, weight, bias, running_mean, running_var, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, running_mean, running_var, eps = inputs
        y, mean, var = output
        ctx.eps = eps
        ctx.train = running_mean is None
        ctx.set_materialize_grads(False)
        ctx.y_is_x_hat = ctx.train and weight is None and bias is None and y.dtype == var.dtype
        needs_x = ctx.train or ctx.needs_input_grad[1]
        if not ctx.train:  # the buffers themselves (no history, nothing extra), not the returned copies
            mean, var = running_mean, running_var
        ctx.save_for_backward(y if ctx.y_is_x_hat else x if needs_x else None, weight, mean, var)
        ctx.dtypes = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)

    @staticmethod
    def backward(ctx, g, g_mean, g_var):
        src, weight, mean, var = ctx.saved_tensors
        mean, var = _opmath(mean), _opmath(var)
        rstd = (var + ctx.eps).rsqrt()
        x_hat = None
        if src is not None and (torch.is_grad_enabled() or g_mean is not None or g_var is not None):
            x_hat = src if ctx.y_is_x_hat else (_opmath(src) - _per_channel(mean, src)) * _per_channel(rstd, src)
        dx = dw = db = None
        if g is not None and torch.is_grad_enabled():     # recorded: double backward or torch.func
            dx, dw, db = batch_norm_backward(_opmath(g), x_hat, rstd, weight, ctx.train, ctx.needs_input_grad)
        elif g is not None:
            dx, dw, db = batch_norm_backward_fused(_opmath(g), src, mean, rstd, weight, ctx.train, ctx.y_is_x_hat,
                                                   ctx.needs_input_grad)
        if ctx.train and ctx.needs_input_grad[0] and (g_mean is not None or g_var is not None):
            extra = batch_norm_stats_backward(g_mean, g_var, x_hat, rstd)
            dx = extra if dx is None else dx + extra
        return (*(t.to(dtype) if t is not None else None for t, dtype in zip((dx, dw, db), ctx.dtypes)),
                None, None, None)


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
        if batch_stats and x.size(0) * math.prod(x.shape[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        y, mean, var = amp.apply(BatchNormFunction, amp.KEEP, x, self.weight, self.bias,
                                 None if batch_stats else running_mean, None if batch_stats else running_var,
                                 self.eps)
        if batch_stats and running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, factor, x.numel() // x.size(1), x.dtype)
        return y


@torch.no_grad()
def update_running_stats(running_mean, running_var, mean, var, momentum: float, n: int, x_dtype) -> None:
    """``running = m batch + (1 - m) running``, with the unbiased batch var, rounded as native's CPU kernel."""
    m = torch.tensor(momentum, dtype=running_mean.dtype)     # native casts momentum to the stats dtype
    running_mean.copy_(m * mean.detach() + (1 - m) * running_mean)
    unbiased = var.detach() * n / (n - 1)
    # native sums the var term in the accumulate type: double for float32 input on CPU
    acc = torch.float64 if x_dtype == torch.float32 else running_var.dtype
    running_var.copy_(m.to(acc) * unbiased.to(acc) + ((1 - m) * running_var).to(acc))


class CustomBatchNorm1d(_BatchNormTwin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` computed by ``BatchNormFunction``."""


class CustomBatchNorm2d(_BatchNormTwin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` computed by ``BatchNormFunction``."""


def _batch_norm(cls, channels: int, **kwargs):
    """A batch norm with random affine params and running stats, so neither is trivial."""
    def build() -> nn.Module:
        m = cls(channels, **kwargs)
        with torch.no_grad():
            if m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            if m.running_mean is not None:
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        return m
    return build


# vmap: BatchNormFunction has generate_vmap_rule. In training the module mutates its running-stat
# buffers, which torch.func refuses for captured tensors ("mutate a captured Tensor"), native
# BatchNorm included: pass the buffers in (functional_call), as trainer.audit.as_function does.
layers.register(
    "batch_norm", native=(nn.BatchNorm1d, nn.BatchNorm2d), custom=(CustomBatchNorm1d, CustomBatchNorm2d),
    reduction=True, vmap=True, saves="x, mean, var (stats fp32); y and var without affine; eval: x only for d gamma",
    cases=lambda: [
        Case("1d-NC", _batch_norm(nn.BatchNorm1d, 3), _randn(6, 3)),
        Case("1d-NCL", _batch_norm(nn.BatchNorm1d, 3), _randn(3, 3, 4)),
        Case("2d", _batch_norm(nn.BatchNorm2d, 2), _randn(2, 2, 3, 3)),
        Case("2d-eval", _batch_norm(nn.BatchNorm2d, 2), _randn(2, 2, 3, 3), train=False),
        Case("2d-affine-false", _batch_norm(nn.BatchNorm2d, 2, affine=False), _randn(3, 2, 2, 2)),
        Case("1d-momentum-none", _batch_norm(nn.BatchNorm1d, 3, momentum=None), _randn(5, 3)),
        Case("2d-no-running-stats", _batch_norm(nn.BatchNorm2d, 2, track_running_stats=False), _randn(2, 2, 3, 3)),
        Case("2d-no-running-stats-eval", _batch_norm(nn.BatchNorm2d, 2, track_running_stats=False),
             _randn(2, 2, 3, 3), train=False),
        Case("1d-eval-affine-false", _batch_norm(nn.BatchNorm1d, 3, affine=False), _randn(4, 3, 2), train=False),
        Case("2d-shifted", _batch_norm(nn.BatchNorm2d, 4), _randn(4, 4, 5, 5, scale=0.5, shift=3.0),
             gradcheck=False),
        Case("2d-wide-affine-false", _batch_norm(nn.BatchNorm2d, 3, affine=False), _randn(4, 3, 6, 6),
             gradcheck=False),
    ],
)
