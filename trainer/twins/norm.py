"""Normalization: LayerNorm and BatchNorm1d/2d, each as math helpers, the Function, then the twin.

Both Functions return their statistics beside ``y``. Batch norm's module needs them to
update its running stats; and because they are outputs (whose grad_fn is the Function)
rather than hidden intermediates, backward may use them and double backward still
reaches ``x`` through them (custom-functions.md section 1, the tutorial ``Sinh``).
Statistics are kept in "opmath", float32 for half/bfloat16 inputs, as native kernels do.

On CPU every op costs a few microseconds of dispatch however small its tensor, an op
with a Python scalar operand costs a second kernel converting it, and a fresh buffer
above ~128 KB page-faults. So the statistics are sums (means and variances come out
through an op's alpha or value), eps is a 0-dim tensor, row sums are matrix products,
and each backward fills one fresh buffer in place.

Each backward has two forms of one formula. A first-order backward records no graph, so
it runs ``*_backward_fused``: dx as ``a g + b x + c`` with per-row/per-channel a, b, c
(the native CPU kernels' arrangement). Double backward and torch.func record the
backward, so they run the plain ``*_backward``, whose every op autograd can differentiate.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.twins import amp, registry
from trainer.twins.amp import LOW, as_dtype, opmath
from trainer.twins.registry import Case


def _rsqrt_var_eps(r: torch.Tensor, n: int, eps: float, squared: bool = False) -> torch.Tensor:
    """``(r^2 / n + eps)^-1/2``, or ``(r / n + eps)^-1/2`` when ``squared``: r is a sum of n squares (or its root).

    eps as a 0-dim tensor and 1/n as an op's alpha/value: scalar operands would each cost
    a conversion kernel.
    """
    eps_t = r.new_full((), eps)
    inv_n = 1 / n if n else math.nan
    return (torch.add(eps_t, r, alpha=inv_n) if squared else torch.addcmul(eps_t, r, r, value=inv_n)).rsqrt_()


def _randn(*shape: int, scale: float = 1.0, shift: float = 0.0):
    def make(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift,)
    return make


# --- layer_norm ---------------------------------------------------------------------------

# Up to this many elements an affine LayerNorm keeps x_hat for backward, which then needs
# ~5 fewer kernels; above it, x and the row sums, so that no buffer of x's size outlives
# the forward besides y (memory traffic and page faults, not launches, dominate there).
KEEP_X_HAT_NUMEL = 1 << 18


def _keeps_x_hat(x, weight, bias) -> bool:
    """Whether the middle output is x_hat: not y (affine), no wider than x (not half), and x is small."""
    return (weight is not None or bias is not None) and x.dtype not in LOW and x.numel() <= KEEP_X_HAT_NUMEL


def layer_norm_forward(x, weight, bias, ndim: int, eps: float):
    """``(y, x_hat or sum, rstd)`` over the last ``ndim`` dims (D values); stats keep them with size 1.

    The middle output is what backward needs besides rstd: x_hat, when ``_keeps_x_hat``;
    else the row sum, which stands in for the mean (every use scales it by 1/D through an
    op's alpha or value: a division would cost a kernel and a scalar conversion).
    """
    dims = -1 if ndim == 1 else tuple(range(-ndim, 0))
    D = x.shape[-1] if ndim == 1 else math.prod(x.shape[-ndim:])
    xf = opmath(x)
    s = xf.sum(dims, keepdim=True)
    y = torch.sub(xf, s, alpha=1 / D if D else math.nan)  # x - mean: two-pass variance
    rstd = _rsqrt_var_eps(torch.linalg.vector_norm(y, dim=dims, keepdim=True), D, eps)
    y.mul_(rstd)                                          # x_hat; in place is safe: forward records no graph
    if _keeps_x_hat(x, weight, bias):
        x_hat = y
        y = x_hat * weight if bias is None else x_hat + bias if weight is None else torch.addcmul(bias, x_hat, weight)
        return y, x_hat, rstd
    if weight is not None:
        y.mul_(weight)
    if bias is not None:
        y.add_(bias)
    return as_dtype(y, x.dtype), s, rstd


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


def layer_norm_backward_fused(g, src, s, rstd, weight, ndim: int, needs):
    """``layer_norm_backward`` for a backward that records no graph: ``src`` is x_hat, or x when ``s`` is given.

    On rows of D values: the row means of g_hat and g_hat x_hat come from ``addmm`` with
    gamma (already scaled by -1/D through alpha, beta=0), so dx = ``rstd (g_hat - mean(g_hat)
    - x_hat mean(g_hat x_hat))`` is two addcmuls and a multiply on one fresh buffer. From
    x, ``t = g (x - mu)`` (mu = s / D) stands in for g x_hat, and x_hat = (x - mu) rstd turns
    into a per-row factor q on x and a constant (the native CPU kernel's arrangement). One
    big temporary at a time; constants ride on alpha/value (a scalar operand would cost a
    kernel and a conversion); in-place ops write only buffers computed from g, so vmap over
    grads still works.
    """
    D = src.shape[-1] if ndim == 1 else math.prod(src.shape[-ndim:])
    rows = ndim == 1 and src.dim() == 2                   # (N, D) with (N, 1) stats: no reshapes
    if rows:
        g2, x2, r = g, opmath(src), rstd
    else:
        g2, x2, r = g.reshape(-1, D), opmath(src).reshape(-1, D), rstd.reshape(-1, 1)
        s = s.reshape(-1, 1) if s is not None else None
    dx = dw = db = None
    if needs[0] or (needs[1] and weight is not None):
        t = g2 * x2 if s is None else (g2 * x2).addcmul_(g2, s, value=-1 / D)   # g x_hat, or g (x - mu)
        if needs[1] and weight is not None:
            dw = t.sum(0) if s is None else (t.t() @ r).squeeze(1)   # d gamma = sum_batch g x_hat
        if needs[0]:
            if weight is None:
                w = g2.new_ones(D, 1)
            else:
                w = weight.unsqueeze(1) if rows else weight.reshape(D, 1)
            m2 = torch.addmm(r, t, w, beta=0, alpha=-1 / D)   # -mean_j g_hat x_hat, or -mean_j g_hat (x - mu)
            del t                                         # before dx: one big temporary at a time
            m1 = torch.addmm(r, g2, w, beta=0, alpha=-1 / D)  # -mean_j g_hat
            if s is not None:                             # from x: x_hat m2 = (x - mu) rstd^2 m2' = q x - q mu
                m2 = m2.mul_(r).mul_(r)
                m1 = torch.addcmul(m1, m2, s, value=-1 / D)
            dx = torch.addcmul(m1, g2, weight if rows else weight.reshape(D)) if weight is not None else g2 + m1
            dx = dx.addcmul_(x2, m2).mul_(r)             # rstd (g_hat - mean(g_hat) - x_hat mean(g_hat x_hat))
    if needs[2]:
        db = g2.sum(0)                                    # d beta = sum_batch g
    if not rows:
        dx = dx.view(src.shape) if dx is not None else None
        dw = dw.view(weight.shape) if dw is not None else None
        db = db.view(src.shape[-ndim:]) if db is not None else None
    return dx, dw, db


def layer_norm_stats_backward(g_mid, g_rstd, x_hat, rstd, ndim: int, mid_is_x_hat: bool) -> torch.Tensor | None:
    """Grad of x from the grads of the outputs besides y (sent only by double backward)."""
    D = math.prod(x_hat.shape[-ndim:])
    dx = None
    if g_mid is not None and mid_is_x_hat:
        dx = layer_norm_backward(g_mid, x_hat, rstd, None, ndim, (True, False, False))[0]
    elif g_mid is not None:
        dx = g_mid.expand(x_hat.shape)                    # d sum/dx = 1
    if g_rstd is not None:
        d = g_rstd * rstd * rstd * x_hat / -D             # d rstd/dx = -rstd^3 (x - mu)/D
        dx = d if dx is None else dx + d
    return dx


class LayerNormFunction(torch.autograd.Function):
    """LayerNorm over the last ``ndim`` dims, returning ``(y, x_hat or sum, rstd)``.

    What it saves is never more than native's x, mean and rstd. An affine transform on a
    small float32/64 x keeps x_hat and rstd (as many bytes), so backward needs neither the
    mean nor a rebuilt x_hat; a large or half-type x keeps x, the row sums and rstd. With
    no affine transform x_hat *is* ``y`` (which the next layer keeps anyway), so it saves y
    and rstd: less than native, though an in-place op on y before backward then raises, as
    for any saved output. Double backward is exact, not once-differentiable: what backward
    reads has history (x is an input, the rest are outputs), and every output's grad is
    handled.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, ndim, eps):
        return layer_norm_forward(x, weight, bias, ndim, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, ndim, eps = inputs
        y, mid, rstd = output
        ctx.ndim = ndim
        ctx.set_materialize_grads(False)  # the stat outputs usually get no grad: None, not zeros
        ctx.mid_is_x_hat = _keeps_x_hat(x, weight, bias)
        if ctx.mid_is_x_hat or (weight is None and bias is None and y.dtype == rstd.dtype):
            ctx.save_for_backward(mid if ctx.mid_is_x_hat else y, weight, None, rstd)    # x_hat
        else:
            ctx.save_for_backward(x, weight, mid, rstd)
        ctx.dtypes = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)

    @staticmethod
    def backward(ctx, g, g_mid, g_rstd):
        src, weight, s, rstd = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        if g_mid is None and g_rstd is None and not torch.is_grad_enabled():   # first order: the common case
            if g is None:
                return None, None, None, None, None
            dx, dw, db = layer_norm_backward_fused(opmath(g), src, s, rstd, weight, ctx.ndim, ctx.needs_input_grad)
            return as_dtype(dx, x_dtype), as_dtype(dw, w_dtype), as_dtype(db, b_dtype), None, None
        x_hat = src
        if s is not None:
            D = math.prod(src.shape[-ctx.ndim:])
            x_hat = torch.sub(opmath(src), s, alpha=1 / D if D else math.nan) * rstd
        dx = dw = db = None
        if g is not None and torch.is_grad_enabled():     # recorded: double backward or torch.func
            dx, dw, db = layer_norm_backward(opmath(g), x_hat, rstd, weight, ctx.ndim, ctx.needs_input_grad)
        elif g is not None:
            dx, dw, db = layer_norm_backward_fused(opmath(g), src, s, rstd, weight, ctx.ndim, ctx.needs_input_grad)
        if ctx.needs_input_grad[0] and (g_mid is not None or g_rstd is not None):
            extra = layer_norm_stats_backward(g_mid, g_rstd, x_hat, rstd, ctx.ndim, ctx.mid_is_x_hat)
            dx = extra if dx is None else dx + extra
        return as_dtype(dx, x_dtype), as_dtype(dw, w_dtype), as_dtype(db, b_dtype), None, None


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


registry.register(
    "layer_norm", native=nn.LayerNorm, custom=CustomLayerNorm, reduction=True,
    saves="x_hat, rstd (stats fp32; x and row sums above 2^18 elements or in half); y and rstd without affine",
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
    """A (C,) tensor shaped to broadcast over x's channel dim 1 (itself for an (N, C) x)."""
    return t if x.dim() == 2 else t.view(-1, *([1] * (x.dim() - 2)))


def _channel_sums(t: torch.Tensor) -> torch.Tensor:
    """Sums over every dim but the channel dim 1, shape (C,)."""
    return t.sum(0) if t.dim() == 2 else t.sum((0, *range(2, t.dim())))


def batch_norm_forward(x, weight, bias, running_mean, running_var, eps: float):
    """``(y, s, q)`` with s, q per channel (over all dims but 1), or the running stats when given (eval).

    In training s is the sum of x and q the sum of squares of x - mean; the mean, the biased
    variance q / M and the unbiased q / (M - 1) all come from them through an op's alpha or
    value, where a division would cost a kernel and a scalar conversion. In eval they are
    copies of running_mean and running_var.
    """
    xf = opmath(x)
    if running_mean is None:
        M = x.numel() // x.shape[1]
        s = _channel_sums(xf)
        y = torch.sub(xf, _per_channel(s, x), alpha=1 / M if M else math.nan)   # two-pass variance
        if x.dim() > 2:                                   # norms along contiguous rows, no y*y temporary
            q = torch.linalg.vector_norm(y.flatten(2), dim=-1).pow_(2).sum(0)
        else:                                             # (a norm down the columns does not vectorize)
            q = (y * y).sum(0)
        rstd = _rsqrt_var_eps(q, M, eps, squared=True)
        k = rstd if weight is None else rstd.mul_(weight)
        y.mul_(_per_channel(k, x))                        # in place is safe: forward records no graph
        if bias is not None:
            y.add_(_per_channel(bias, x))
        return as_dtype(y, x.dtype), s, q
    mean, var = running_mean.to(xf.dtype, copy=True), running_var.to(xf.dtype, copy=True)
    k = _rsqrt_var_eps(var, 1, eps, squared=True)
    if weight is not None:
        k = k.mul_(weight)
    shift = torch.addcmul(bias, mean, k, value=-1) if bias is not None else (mean * k).neg_()
    # y = x * k + shift per channel, as the native CPU kernel computes it
    return as_dtype((xf * _per_channel(k, x)).add_(_per_channel(shift, x)), x.dtype), mean, var


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


def batch_norm_backward_fused(g, src, s, rstd, weight, src_is_x_hat: bool, needs):
    """``batch_norm_backward`` in training, for a backward that records no graph.

    ``src`` is x_hat, or x with its channel sums ``s`` (mu = s / M). From x, the sums of
    g x_hat are ``rstd (sum g x - mu sum g)``: no x_hat temporary (native sums g (x - mu),
    which cancels less when |mu| >> sigma; both agree to float32 tolerance at |mu| ~ 10
    sigma). dx = ``gamma rstd (g - sum g / M - x_hat sum(g x_hat) / M)`` in one fresh buffer,
    three passes. In-place ops write only buffers computed from g, so vmap over grads works.
    """
    M = g.numel() // g.shape[1]
    xf = opmath(src)
    dx = dw = db = None
    sum_g = _channel_sums(g)                              # d beta = sum g
    if needs[0] or (needs[1] and weight is not None):
        sum_gx = _channel_sums(g * xf)
        if src_is_x_hat:
            q = sum_gx                                    # sum g x_hat
        else:                                             # sum g x_hat = rstd (sum g x - mu sum g)
            sum_gx = torch.addcmul(sum_gx, s, sum_g, value=-1 / M).mul_(rstd)
            q = sum_gx * rstd                             # x_hat = (x - mu) rstd: its factor on x
        if needs[1] and weight is not None:
            dw = sum_gx                                   # d gamma = sum g x_hat
        if needs[0]:
            # dx / (gamma rstd) = g - x_hat sum(g x_hat) / M - sum g / M; from x, mu q enters the constant
            dx = torch.addcmul(g, xf, _per_channel(q, g), value=-1 / M)
            c = sum_g if src_is_x_hat else torch.addcmul(sum_g, q, s, value=-1 / M)
            dx = dx.sub_(_per_channel(c, g), alpha=1 / M)
            dx = dx.mul_(_per_channel(rstd if weight is None else rstd * weight, g))
    if needs[2]:
        db = sum_g
    return dx, dw, db


def batch_norm_stats_backward(g_s, g_q, x_hat, rstd) -> torch.Tensor:
    """Grad of x from the grads of the batch-stat outputs (sent only by double backward)."""
    dx = torch.zeros_like(x_hat)
    if g_s is not None:
        dx = dx + _per_channel(g_s, x_hat)                # d s/dx = 1
    if g_q is not None:
        dx = dx + x_hat * _per_channel(2 * g_q / rstd, x_hat)   # d q/dx = 2 (x - mu)
    return dx


class BatchNormFunction(torch.autograd.Function):
    """Batch norm over all dims but 1, returning ``(y, s, q)`` (see ``batch_norm_forward``; opmath dtype).

    With ``running_mean``/``running_var`` given it normalizes with them (eval); otherwise
    with the batch stats, which it returns so the module can update its running stats
    outside the Function. Saves x, s and q (as many bytes as native's x, mean and invstd);
    y instead of x in training without an affine transform (y *is* x_hat); in eval the
    running-stat buffers, and x only if the weight needs a grad. Double backward is exact,
    for the reason given for ``LayerNormFunction`` (in eval the stats are constants).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, eps):
        return batch_norm_forward(x, weight, bias, running_mean, running_var, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, running_mean, running_var, eps = inputs
        y, s, q = output
        ctx.eps = eps
        ctx.train = running_mean is None
        ctx.set_materialize_grads(False)
        ctx.y_is_x_hat = ctx.train and weight is None and bias is None and y.dtype == q.dtype
        if ctx.train:
            ctx.save_for_backward(y if ctx.y_is_x_hat else x, weight, s, q)
        else:  # the buffers themselves (no history, nothing extra), not the returned copies
            ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, running_mean, running_var)
        ctx.dtypes = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)

    @staticmethod
    def backward(ctx, g, g_s, g_q):
        src, weight, s, q = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        M = 1 if src is None else src.numel() // src.shape[1]
        rstd = _rsqrt_var_eps(opmath(q), M if ctx.train else 1, ctx.eps, squared=True)
        if ctx.train and g_s is None and g_q is None and not torch.is_grad_enabled():   # the common case
            if g is None:
                return None, None, None, None, None, None
            dx, dw, db = batch_norm_backward_fused(opmath(g), src, s, rstd, weight, ctx.y_is_x_hat,
                                                   ctx.needs_input_grad)
            return as_dtype(dx, x_dtype), as_dtype(dw, w_dtype), as_dtype(db, b_dtype), None, None, None
        x_hat = None
        if src is not None:
            mean = opmath(s) / M if ctx.train else opmath(s)
            x_hat = src if ctx.y_is_x_hat else (opmath(src) - _per_channel(mean, src)) * _per_channel(rstd, src)
        dx = dw = db = None
        if g is not None:
            dx, dw, db = batch_norm_backward(opmath(g), x_hat, rstd, weight, ctx.train, ctx.needs_input_grad)
        if ctx.train and ctx.needs_input_grad[0] and (g_s is not None or g_q is not None):
            extra = batch_norm_stats_backward(g_s, g_q, x_hat, rstd)
            dx = extra if dx is None else dx + extra
        return as_dtype(dx, x_dtype), as_dtype(dw, w_dtype), as_dtype(db, b_dtype), None, None, None


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
        y, s, q = amp.apply(BatchNormFunction, amp.KEEP, x, self.weight, self.bias,
                            None if batch_stats else running_mean, None if batch_stats else running_var, self.eps)
        if batch_stats and running_mean is not None:
            update_running_stats(running_mean, running_var, s, q, factor, x.numel() // x.size(1))
        return y


def update_running_stats(running_mean, running_var, s, q, momentum: float, n: int) -> None:
    """``running = (1 - m) running + m batch``: the mean ``s / n`` and the unbiased var ``q / (n - 1)``.

    Four in-place kernels, the constants on alpha (native computes this in double; the
    float32 result agrees to about an ulp).
    """
    s, q = s.detach(), q.detach()
    running_mean.sub_(running_mean, alpha=momentum).add_(s, alpha=momentum / n if n else math.nan)
    running_var.sub_(running_var, alpha=momentum).add_(q, alpha=momentum / (n - 1) if n > 1 else math.nan)


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
registry.register(
    "batch_norm", native=(nn.BatchNorm1d, nn.BatchNorm2d), custom=(CustomBatchNorm1d, CustomBatchNorm2d),
    reduction=True, vmap=True, saves="x, sums of x and (x-mean)^2 (fp32); y for x without affine; eval: x only for d gamma",
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
