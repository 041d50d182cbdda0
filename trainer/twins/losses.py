"""Losses (each also a `loss:` entry): the Function, then its twin; under autocast in float32, like native's.
``r`` below is dL/d(loss element): the incoming grad g, divided by the element count (or weight sum) for ``mean``."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from trainer.twins import amp
from trainer.twins.amp import in_float32, opmath


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    return loss if reduction == "none" else loss.sum() if reduction == "sum" else loss.mean()


def _r(g: torch.Tensor, reduction: str, count: int | torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """r: g, or for mean g / count, and 0 on rows not ``valid`` even if all are (count = 0, a NaN loss, as native)."""
    if reduction != "mean":
        return g
    return g / count if valid is None else torch.where(valid, g / count, 0)


def _x_and_t(ctx, dx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dt = −dx), each only if asked for: the grads of a loss of x − t."""
    return (dx if ctx.needs_input_grad[0] else None), (-dx if ctx.needs_input_grad[1] else None)


def _broadcast(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Native's broadcasting of a differently sized target, warning included (autograd sums the expand)."""
    if t.shape != x.shape:
        if not torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn
            warnings.warn(f"Using a target size ({t.size()}) that is different to the input size ({x.size()}). "
                          "This will likely lead to incorrect results due to broadcasting. "
                          "Please ensure they have the same size.", stacklevel=3)
        x, t = torch.broadcast_tensors(x, t)
    return x, t


class MSELossFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x, t, reduction):
        return _reduce((x - t) ** 2, reduction)  # L = (x − t)²

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.reduction = inputs[2]
        ctx.save_for_backward(inputs[0], inputs[1])  # as native

    @staticmethod
    def backward(ctx, g):
        x, t, g = map(opmath, (*ctx.saved_tensors, g))
        return *_x_and_t(ctx, 2 * (x - t) * _r(g, ctx.reduction, x.numel())), None  # dx = 2 (x − t) r


class CustomMSELoss(nn.MSELoss):
    function = MSELossFunction

    def forward(self, input, target):
        return amp.apply(MSELossFunction, amp.FP32, *_broadcast(input, target), self.reduction)


class L1LossFunction(torch.autograd.Function):
    """``(L, sign(x − t))``: the sign, all backward needs, is an int8 output so that it can be saved (1 B/elem)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, reduction):
        d = opmath(x) - opmath(t)
        return _reduce(d.abs(), reduction).to(x.dtype), d.sign().to(torch.int8)  # L = |x − t|

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.reduction = inputs[2]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, g, _):
        (sign,) = ctx.saved_tensors
        # dx = sign(x − t) r (0 at x == t, as native), dt = −dx (autograd rounds each to its input's dtype)
        return *_x_and_t(ctx, sign * _r(opmath(g), ctx.reduction, sign.numel())), None


class CustomL1Loss(nn.L1Loss):
    function = L1LossFunction

    def forward(self, input, target):
        return amp.apply(L1LossFunction, amp.FP32, *_broadcast(input, target), self.reduction)[0]


class HuberLossFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x, t, reduction, delta):
        # L = ½ d² where |d| < δ, else δ (|d| − ½ δ), with d = x − t: both are h (d − ½ h), h = clamp(d, −δ, δ)
        d = x - t
        h = d.clamp(-delta, delta)
        return _reduce(h * (d - 0.5 * h), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.reduction, ctx.delta = inputs[2], inputs[3]
        ctx.save_for_backward(inputs[0], inputs[1])  # as native

    @staticmethod
    def backward(ctx, g):
        x, t, g = map(opmath, (*ctx.saved_tensors, g))
        # dx = clamp(x − t, −δ, δ) r, as hardtanh, whose own derivative is 0 at ±δ like native's second derivative
        dx = F.hardtanh(x - t, -ctx.delta, ctx.delta) * _r(g, ctx.reduction, x.numel())
        return *_x_and_t(ctx, dx), None, None


class CustomHuberLoss(nn.HuberLoss):
    function = HuberLossFunction

    def forward(self, input, target):
        return amp.apply(HuberLossFunction, amp.FP32, *_broadcast(input, target), self.reduction, self.delta)


def _class_weights(x, t, w, ignore_index, eps):
    """``(T, valid, count)``: L_n = −Σ_c T[n, c] log p[n, c], with T = w ⊙ ((1 − ε) onehot(y) + ε / C) on the rows
    (``valid``) whose class y is not ignore_index, else 0 (count = Σ_valid w_y, what ``mean`` divides by); or for
    probabilities t, T = w ⊙ ((1 − ε) t + ε / C) (count = the number of rows, valid None). Class dim 1 (0 unbatched)."""
    cdim = 1 if x.dim() > 1 else 0
    C, along_classes = x.shape[cdim], (-1, *[1] * (x.dim() - cdim - 1))
    w = 1 if w is None else w.view(along_classes)
    if t.is_floating_point():
        return w * ((1 - eps) * t + eps / C), None, x.numel() // C
    valid = (t != ignore_index).unsqueeze(cdim)
    onehot = ((torch.arange(C, device=x.device).view(along_classes) == t.unsqueeze(cdim)) & valid).to(x.dtype)
    return w * ((1 - eps) * onehot + eps / C * valid.to(x.dtype)), valid, (w * onehot).sum()


class CrossEntropyFunction(torch.autograd.Function):
    """Cross entropy of logits ``x`` with class indices or class probabilities ``t``, as ``nn.CrossEntropyLoss``."""
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x, t, w, ignore_index, reduction, eps):
        cdim = 1 if x.dim() > 1 else 0
        T, _, count = _class_weights(x, t, w, ignore_index, eps)
        loss = -(T * x.log_softmax(cdim)).sum(cdim)  # L_n = −Σ_c T[n, c] log p[n, c]
        return loss.sum() / count if reduction == "mean" else _reduce(loss, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, t, w, *ctx.options = inputs
        ctx.save_for_backward(inputs[0], t, w)  # the logits (as many bytes as native's log p): log p is recomputed

    @staticmethod
    def backward(ctx, g):
        x, t, w, g = map(opmath, (*ctx.saved_tensors, g))
        ignore_index, reduction, eps = ctx.options
        cdim = 1 if x.dim() > 1 else 0
        T, valid, count = _class_weights(x, t, w, ignore_index, eps)
        r = _r(g.unsqueeze(cdim) if reduction == "none" else g, reduction, count, valid)  # per row, class dim kept
        # dx = r (p Σ_c T − T): dL/dlog p = −r T, then log_softmax's backward
        dx = r * (x.softmax(cdim) * T.sum(cdim, keepdim=True) - T) if ctx.needs_input_grad[0] else None
        # dt = −r (1 − ε) w log p, as dT/dt = (1 − ε) w (probabilities only: indices have no grad)
        w = 1 if w is None else w.view(-1, *[1] * (x.dim() - cdim - 1))
        dt = -r * (1 - eps) * w * x.log_softmax(cdim) if ctx.needs_input_grad[1] else None
        return dx, dt, None, None, None, None


def _check_target(x: torch.Tensor, t: torch.Tensor, ignore_index: int) -> None:
    """Native's errors for a mismatched target or a class index out of range, which the one-hot would hide."""
    probs = t.is_floating_point()
    if probs and ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    if x.dim() < 2:
        return
    xs, ts = x.shape, t.shape
    if ts and xs[0] != ts[0]:
        raise ValueError(f"Expected input batch_size ({xs[0]}) to match target batch_size ({ts[0]}).")
    if ts != xs if probs else len(ts) != len(xs) - 1 or ts[1:] != xs[2:]:
        expected = xs if probs else xs[:1] + xs[2:]
        raise RuntimeError(f"Expected target size {list(expected)}, got {list(ts)}")
    # a class index out of range: native raises (CPU) or asserts on the device (CUDA, no sync); under vmap
    # (per-sample grads) a data-dependent check cannot run, and native's batching rule does not check either;
    # compiled, the gather's own bounds check in the generated code does it
    if not probs and not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(t):
        bad = ((t < 0) | (t >= xs[1])) & (t != ignore_index)
        if t.device.type == "cpu":
            if bad.any():
                raise IndexError(f"Target {int(t[bad][0])} is out of bounds.")
        else:
            torch._assert_async(~bad.any(), "Target is out of bounds.")


class CustomCrossEntropyLoss(nn.CrossEntropyLoss):
    function = CrossEntropyFunction

    def forward(self, input, target):
        _check_target(input, target, self.ignore_index)
        return amp.apply(CrossEntropyFunction, amp.FP32, input, target, self.weight, self.ignore_index,
                         self.reduction, self.label_smoothing)


class BCEWithLogitsFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x, t, w, pw, reduction):
        # L = −w [pw t log σ(x) + (1 − t) log σ(−x)]
        pw_t = t if pw is None else pw * t
        loss = -(pw_t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))
        return _reduce(loss if w is None else w * loss, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.reduction = inputs[4]
        ctx.save_for_backward(*inputs[:4])  # inputs and buffers only, as native

    @staticmethod
    def backward(ctx, g):
        x, t, w, pw, g = map(opmath, (*ctx.saved_tensors, g))
        r = _r(g, ctx.reduction, x.numel()) * (1 if w is None else w)
        pw = 1 if pw is None else pw
        # dx = r ((1 − t) σ(x) − pw t σ(−x)), dt = r (log σ(−x) − pw log σ(x))
        dx = r * ((1 - t) * torch.sigmoid(x) - pw * t * torch.sigmoid(-x)) if ctx.needs_input_grad[0] else None
        dt = r * (F.logsigmoid(-x) - pw * F.logsigmoid(x)) if ctx.needs_input_grad[1] else None
        return dx, dt, None, None, None


class CustomBCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    function = BCEWithLogitsFunction

    def forward(self, input, target):
        if target.size() != input.size():
            raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
        return amp.apply(BCEWithLogitsFunction, amp.FP32, input, target, self.weight, self.pos_weight, self.reduction)
