"""Losses: math helpers, then the Function, then the twin, one block per loss (each is also a `loss:` entry).

Every backward is built from differentiable torch ops of saved inputs (or of a saved,
non-differentiable sign), so double backward works. Half and bfloat16 inputs are computed
in float32 and rounded once; under autocast the twins run in float32, like native losses.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from trainer.twins import amp, registry
from trainer.twins.amp import as_dtype, opmath
from trainer.twins.registry import Case

def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    return loss if reduction == "none" else loss.sum() if reduction == "sum" else loss.mean()


def _scale(g: torch.Tensor, reduction: str, n: int) -> torch.Tensor:
    """The incoming grad as a per-element factor: g for none/sum, g/N for mean."""
    return opmath(g) / n if reduction == "mean" else opmath(g)


def _broadcast(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Native's broadcasting of a differently sized target, warning included (autograd sums the expand)."""
    if t.shape != x.shape:
        if not torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn
            warnings.warn(f"Using a target size ({t.size()}) that is different to the input size ({x.size()}). "
                          "This will likely lead to incorrect results due to broadcasting. "
                          "Please ensure they have the same size.", stacklevel=3)
        x, t = torch.broadcast_tensors(x, t)
    return x, t


def _pair(*shape: int, target: str = "randn", scale: float = 1.0):
    """(input, float target) in float64; the target is standard normal or uniform in [0, 1]."""
    def make(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
        t = torch.randn if target == "randn" else torch.rand
        return x, t(*shape, generator=gen, dtype=torch.float64)
    return make


def _fixed(x: list, t: list):
    return lambda gen: (torch.tensor(x, dtype=torch.float64), torch.tensor(t, dtype=torch.float64))


# --- mse -----------------------------------------------------------------------------------

class MSELossFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, reduction):
        d = opmath(x) - opmath(t)
        return _reduce(d.mul_(d), reduction).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.reduction = inputs[2]
        ctx.save_for_backward(inputs[0], inputs[1])  # as native; x − t would cost as much and break double backward

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        # dx = 2(x − t)·g/N (no /N for sum), dt = −dx
        dx = (opmath(x) - opmath(t)) * (2 * _scale(g, ctx.reduction, x.numel()))
        return (dx.to(x.dtype) if ctx.needs_input_grad[0] else None,
                dx.neg().to(t.dtype) if ctx.needs_input_grad[1] else None, None)


class CustomMSELoss(nn.MSELoss):
    """``nn.MSELoss`` computed by ``MSELossFunction``."""

    function = MSELossFunction

    def forward(self, input, target):
        return amp.apply(MSELossFunction, amp.FP32, *_broadcast(input, target), self.reduction)


registry.register(
    "mse", native=nn.MSELoss, custom=CustomMSELoss, saves="x, t (inputs)", reduction=True,
    cases=lambda: [
        Case("mse-mean", nn.MSELoss, _pair(4, 5)),
        Case("mse-sum", lambda: nn.MSELoss(reduction="sum"), _pair(4, 5)),
        Case("mse-none", lambda: nn.MSELoss(reduction="none"), _pair(2, 3, 4)),
        Case("mse-broadcast-target", nn.MSELoss,
             lambda gen: (torch.randn(4, 5, generator=gen, dtype=torch.float64),
                          torch.randn(4, 1, generator=gen, dtype=torch.float64))),
        Case("mse-scalar", nn.MSELoss, _fixed(1.5, -0.25)),
    ],
)


# --- l1 ------------------------------------------------------------------------------------

class L1LossFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, reduction):
        d = opmath(x) - opmath(t)
        # sign(x − t) as int8 is all backward needs: an extra output, so it can be saved
        sign = d.sign().to(torch.int8)
        return _reduce(d.abs_(), reduction).to(x.dtype), sign

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.reduction, ctx.numel, ctx.dtypes = inputs[2], inputs[0].numel(), (inputs[0].dtype, inputs[1].dtype)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zeros for the sign's (never used) grad
        ctx.save_for_backward(output[1])  # 1 byte per element; its derivative is 0 a.e.

    @staticmethod
    def backward(ctx, g, _):
        if g is None:
            return None, None, None
        (sign,) = ctx.saved_tensors
        # dx = sign(x − t)·g/N (0 at x == t, as native), dt = −dx
        s = _scale(g, ctx.reduction, ctx.numel)
        x_dtype, t_dtype = ctx.dtypes
        return ((sign * s).to(x_dtype) if ctx.needs_input_grad[0] else None,
                (sign * -s).to(t_dtype) if ctx.needs_input_grad[1] else None, None)


class CustomL1Loss(nn.L1Loss):
    """``nn.L1Loss`` computed by ``L1LossFunction``."""

    function = L1LossFunction

    def forward(self, input, target):
        return amp.apply(L1LossFunction, amp.FP32, *_broadcast(input, target), self.reduction)[0]


registry.register(
    "l1", native=nn.L1Loss, custom=CustomL1Loss, saves="sign(x − t) (int8, an extra output)", reduction=True,
    cases=lambda: [
        Case("l1-mean", nn.L1Loss, _pair(4, 5)),
        Case("l1-sum", lambda: nn.L1Loss(reduction="sum"), _pair(4, 5)),
        Case("l1-none", lambda: nn.L1Loss(reduction="none"), _pair(2, 3, 4)),
        Case("l1-x-equals-t", nn.L1Loss, _fixed([1.0, -2.0, 0.5, 0.0], [1.0, -2.0, 0.25, 0.0]), gradcheck=False),
    ],
)


# --- huber ---------------------------------------------------------------------------------

class HuberLossFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, reduction, delta):
        d = opmath(x) - opmath(t)
        # ½d² where |d| < δ, else δ(|d| − ½δ): both are h(d − ½h) with h = clamp(d, −δ, δ)
        h = d.clamp(-delta, delta)
        return _reduce(d.sub_(h, alpha=0.5).mul_(h), reduction).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.reduction, ctx.delta = inputs[2], inputs[3]
        ctx.save_for_backward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        # dx = clamp(x − t, −δ, δ)·g/N, dt = −dx; hardtanh's backward is 0 at ±δ, as native's second derivative
        dx = F.hardtanh_(opmath(x) - opmath(t), -ctx.delta, ctx.delta) * _scale(g, ctx.reduction, x.numel())
        return (dx.to(x.dtype) if ctx.needs_input_grad[0] else None,
                dx.neg().to(t.dtype) if ctx.needs_input_grad[1] else None, None, None)


class CustomHuberLoss(nn.HuberLoss):
    """``nn.HuberLoss`` computed by ``HuberLossFunction``."""

    function = HuberLossFunction

    def forward(self, input, target):
        return amp.apply(HuberLossFunction, amp.FP32, *_broadcast(input, target), self.reduction, self.delta)


registry.register(
    "huber", native=nn.HuberLoss, custom=CustomHuberLoss, saves="x, t (inputs)", reduction=True,
    cases=lambda: [
        Case("huber-mean", nn.HuberLoss, _pair(4, 5, scale=2.0)),
        Case("huber-sum-delta0.5", lambda: nn.HuberLoss(reduction="sum", delta=0.5), _pair(4, 5)),
        Case("huber-none-delta2", lambda: nn.HuberLoss(reduction="none", delta=2.0), _pair(2, 3, 4, scale=3.0)),
        Case("huber-at-delta", lambda: nn.HuberLoss(delta=0.5),
             _fixed([1.0, -1.0, 0.75, 0.0, 2.0], [0.5, -0.5, 0.25, 0.5, 0.0]), gradcheck=False),
    ],
)


# --- cross_entropy -------------------------------------------------------------------------

def _along_classes(w: torch.Tensor, x: torch.Tensor, cdim: int) -> torch.Tensor:
    """Class weights (C,) shaped to broadcast along x's class dim."""
    return w.view(-1, *[1] * (x.dim() - cdim - 1))


def _class_index_terms(t, w, ignore_index, cdim):
    """(valid, safe target, w_y or None), each with a size-1 class dim: ignored positions get target 0.

    Without class weights w_y is ``valid`` itself, used as a 0/1 factor (None here).
    """
    t = t.unsqueeze(cdim)
    valid = t != ignore_index
    ts = t * valid                                        # integer times bool: no scalar operand to convert
    return valid, ts, None if w is None else w[ts] * valid


def cross_entropy_forward(x, t, w, ignore_index, reduction, eps):
    """(L, p) for class-index targets, (L, log p) for probabilities; L as ``nn.CrossEntropyLoss``.

    Class indices: L = (1−ε)·w_y·(−log p_y) + (ε/C)·Σ_c w_c(−log p_c), mean over Σ_valid w_y.
    Only log p_y = z_y − log Σ e^z (z = x − max x) and, with smoothing, Σ_c w_c z_c are needed,
    so z turns into p in place: one big buffer, and backward needs no exp.
    Probabilities: L = −Σ_c w_c t'_c log p_c with t' = (1−ε)t + ε/C, mean over the N·d samples.
    """
    cdim = 1 if x.dim() > 1 else 0
    C = x.shape[cdim]
    z = x - x.amax(cdim, keepdim=True) if C else x.clone()   # amax refuses an empty dim
    if t.is_floating_point():
        # log p = z − log Σ e^z, in that order (as native log_softmax) for precision
        logp = z.sub_(z.exp().sum(cdim, keepdim=True).log_())
        tw = t * (1 - eps) + eps / C if eps > 0 else t
        tw = tw if w is None else tw * _along_classes(w, x, cdim)
        return _reduce((logp * tw).sum(cdim).neg_(), reduction), logp
    valid, ts, wy = _class_index_terms(t, w, ignore_index, cdim)
    wy = valid.to(x.dtype) if wy is None else wy
    zy = z.gather(cdim, ts)
    if eps > 0:                                           # Σ_c w_c z_c, before z turns into p
        zw = z.sum(cdim, keepdim=True) if w is None else (z.movedim(cdim, -1) @ w).unsqueeze(cdim)
    p = z.exp_()
    s = p.sum(cdim, keepdim=True)
    p = p.div_(s)
    log_s = s.log_()
    loss = (log_s - zy) * wy                              # w_y (−log p_y)
    if eps > 0:                                           # Σ_c w_c (−log p_c) = Σw log Σe^z − Σ_c w_c z_c
        smooth = torch.sub(log_s * (C if w is None else w.sum()), zw) * valid
        loss = torch.add(loss * (1 - eps), smooth, alpha=eps / C)
    if reduction == "none":
        return loss.squeeze(cdim), p
    return (loss.sum() / wy.sum() if reduction == "mean" else loss.sum()), p


def cross_entropy_backward(g, g_mid, mid, t, w, ignore_index, reduction, eps, need_x, need_t):
    """Grads w.r.t. the logits and (probabilities only) the target, from ``mid``: p, or log p for probabilities."""
    cdim = 1 if mid.dim() > 1 else 0
    C = mid.shape[cdim]
    probs = t.is_floating_point()
    p = mid.exp() if probs else mid
    dx = dt = None
    if g is not None and probs:
        logp = mid
        s = g.unsqueeze(cdim) if reduction == "none" else g / (logp.numel() // max(C, 1)) if reduction == "mean" else g
        tw = t * (1 - eps) + eps / C if eps > 0 else t
        tw = tw if w is None else tw * _along_classes(w, logp, cdim)
        if need_x:  # dx = s·(p·Σ_c w_c t'_c − w⊙t')
            dx = torch.addcmul(p * (tw.sum(cdim, keepdim=True) * s), tw, s, value=-1)
        if need_t:  # dt = −s·(1−ε)·w⊙log p
            dt = logp * (-(1 - eps) * (s if w is None else s * _along_classes(w, logp, cdim)))
    elif g is not None and need_x:
        valid, ts, wy = _class_index_terms(t, w, ignore_index, cdim)
        wy = valid.to(p.dtype) if wy is None else wy
        if reduction == "none":
            g = g.unsqueeze(cdim)
        elif reduction == "mean" and w is None:           # Σ_valid w_y counts the valid rows: 0 only if none is
            g = g / wy.sum().clamp_min(1)
        elif reduction == "mean":  # g/Σw_y on valid rows; 0 on ignored ones even when all are (NaN loss)
            g = torch.where(valid, g / torch.where(valid, wy.sum(), 1), 0)
        # row grad = (1−ε)w_y(p − e_y) + (ε/C)(p·Σw − w), times g (divided by Σ_valid w_y for mean)
        c1 = wy * g if eps == 0 else wy * g * (1 - eps)
        if eps > 0:
            c2 = (valid * g) * (eps / C)
            dx = p * (c1 + c2 * (C if w is None else w.sum()))
        else:
            dx = p * c1
        dx.scatter_add_(cdim, ts, c1.neg())  # dx is new and depends on every tensor here
        if eps > 0:
            dx.sub_(c2 if w is None else c2 * _along_classes(w, p, cdim))
    if g_mid is not None and need_x:  # the second output's own grad (double backward)
        d = g_mid - p * g_mid.sum(cdim, keepdim=True) if probs else p * g_mid - p * (p * g_mid).sum(cdim, keepdim=True)
        dx = d if dx is None else dx + d
    return dx, dt


class CrossEntropyFunction(torch.autograd.Function):
    """Returns (loss, p), or (loss, log p) for probability targets: backward saves it and stays differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, w, ignore_index, reduction, eps):
        tf = opmath(t) if t.is_floating_point() else t
        loss, mid = cross_entropy_forward(opmath(x), tf, opmath(w), ignore_index, reduction, eps)
        return as_dtype(loss, x.dtype), as_dtype(mid, x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, t, w, ctx.ignore_index, ctx.reduction, ctx.eps = inputs
        ctx.set_materialize_grads(False)  # the second output's grad is None unless someone uses it
        # p or log p (native saves log p), not the logits: as many bytes, and all backward needs
        ctx.save_for_backward(output[1], t, w)

    @staticmethod
    def backward(ctx, g, g_mid):
        mid, t, w = ctx.saved_tensors
        tf = opmath(t) if t.is_floating_point() else t
        dx, dt = cross_entropy_backward(opmath(g), opmath(g_mid), opmath(mid), tf, opmath(w),
                                        ctx.ignore_index, ctx.reduction, ctx.eps, *ctx.needs_input_grad[:2])
        return (as_dtype(dx, mid.dtype) if dx is not None else None,
                as_dtype(dt, t.dtype) if dt is not None else None, None, None, None, None)


def _check_target(x: torch.Tensor, t: torch.Tensor, ignore_index: int) -> None:
    """Native's errors for a mismatched target, which gather would otherwise read as a subset."""
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


class CustomCrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` computed by ``CrossEntropyFunction`` (class indices or probabilities)."""

    function = CrossEntropyFunction

    def forward(self, input, target):
        _check_target(input, target, self.ignore_index)
        return amp.apply(CrossEntropyFunction, amp.FP32, input, target, self.weight, self.ignore_index,
                         self.reduction, self.label_smoothing)[0]


def _ce(*shape: int, ignore: int | None = None, probs: bool = False, scale: float = 1.0):
    """(logits, target): class indices drawn over C = shape[1] (or shape[0] unbatched), some set to ``ignore``."""
    def make(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
        cdim = 1 if len(shape) > 1 else 0
        if probs:
            return x, torch.randn(*shape, generator=gen, dtype=torch.float64).softmax(cdim)
        t = torch.randint(shape[cdim], shape[:cdim] + shape[cdim + 1:], generator=gen)
        if ignore is not None:
            t.view(-1)[::3] = ignore
        return x, t
    return make


def _weights(*w: float):
    return torch.tensor(w, dtype=torch.float64)


registry.register(
    "cross_entropy", native=nn.CrossEntropyLoss, custom=CustomCrossEntropyLoss, reduction=True,
    saves="p, log p for probabilities (an extra output, as many bytes as native's log p), target, weight",
    cases=lambda: [
        Case("ce-mean", nn.CrossEntropyLoss, _ce(6, 5)),
        Case("ce-sum", lambda: nn.CrossEntropyLoss(reduction="sum"), _ce(6, 5)),
        Case("ce-none", lambda: nn.CrossEntropyLoss(reduction="none"), _ce(6, 5)),
        Case("ce-weight", lambda: nn.CrossEntropyLoss(weight=_weights(0.5, 2.0, 1.0, 0.25, 3.0)), _ce(6, 5)),
        Case("ce-ignore", nn.CrossEntropyLoss, _ce(6, 5, ignore=-100)),
        Case("ce-ignore-class2-weight-sum",
             lambda: nn.CrossEntropyLoss(weight=_weights(0.5, 2.0, 1.0, 0.25, 3.0), ignore_index=2, reduction="sum"),
             _ce(6, 5, ignore=2)),
        Case("ce-smoothing", lambda: nn.CrossEntropyLoss(label_smoothing=0.2), _ce(6, 5)),
        Case("ce-smoothing-weight-ignore",
             lambda: nn.CrossEntropyLoss(weight=_weights(0.5, 2.0, 1.0, 0.25, 3.0), label_smoothing=0.1),
             _ce(6, 5, ignore=-100)),
        Case("ce-smoothing-weight-ignore-none",
             lambda: nn.CrossEntropyLoss(weight=_weights(0.5, 2.0, 1.0, 0.25, 3.0), label_smoothing=0.1,
                                         reduction="none"), _ce(6, 5, ignore=-100)),
        Case("ce-NCd", lambda: nn.CrossEntropyLoss(ignore_index=1), _ce(2, 4, 5, ignore=1)),
        Case("ce-NCdd-weight-smoothing",
             lambda: nn.CrossEntropyLoss(weight=_weights(1.0, 0.5, 2.0), label_smoothing=0.3), _ce(2, 3, 2, 3)),
        Case("ce-unbatched", nn.CrossEntropyLoss, _ce(7)),
        Case("ce-probs", nn.CrossEntropyLoss, _ce(4, 5, probs=True)),
        Case("ce-probs-weight-smoothing-sum",
             lambda: nn.CrossEntropyLoss(weight=_weights(0.5, 2.0, 1.0, 0.25, 3.0), label_smoothing=0.2,
                                         reduction="sum"), _ce(4, 5, probs=True)),
        Case("ce-probs-NCd-none", lambda: nn.CrossEntropyLoss(reduction="none"), _ce(2, 3, 4, probs=True)),
        Case("ce-all-ignored", nn.CrossEntropyLoss,
             lambda gen: (torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.full((4,), -100)),
             gradcheck=False),
        Case("ce-all-ignored-weight-smoothing",
             lambda: nn.CrossEntropyLoss(weight=_weights(0.5, 2.0, 1.0, 0.25, 3.0), label_smoothing=0.1),
             lambda gen: (torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.full((4,), -100)),
             gradcheck=False),
        Case("ce-zero-weight-rows", lambda: nn.CrossEntropyLoss(weight=_weights(0.0, 0.0, 1.0)),
             lambda gen: (torch.randn(3, 3, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 0])),
             gradcheck=False),
        Case("ce-large-logits-smoothing", lambda: nn.CrossEntropyLoss(label_smoothing=0.1), _ce(8, 6, scale=300.0),
             gradcheck=False),
        Case("ce-empty-batch", nn.CrossEntropyLoss, _ce(0, 5), gradcheck=False),
    ],
)


# --- bce_with_logits -----------------------------------------------------------------------

def _log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    # log σ(x) = min(x, 0) − log1p(e^{−|x|}): stable for any |x|
    return x.clamp_max(0).sub_(x.abs().neg_().exp().log1p())  # exp's output stays unmodified: double backward


class BCEWithLogitsFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x_in, t, w, pw, reduction):
        x, t, w, pw = map(opmath, (x_in, t, w, pw))
        # L = −[pw·t·log σ(x) + (1 − t)·log σ(−x)] = (1 − t)x − (1 + (pw − 1)t)·log σ(x), times w
        loss = torch.addcmul(x, t, x, value=-1)
        if pw is None:
            loss.sub_(_log_sigmoid(x))
        else:
            loss = torch.addcmul(loss, (pw - 1) * t + 1, _log_sigmoid(x), value=-1)
        return _reduce(loss if w is None else loss * w, reduction).to(x_in.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.reduction = inputs[4]
        ctx.save_for_backward(*inputs[:4])  # inputs and buffers only

    @staticmethod
    def backward(ctx, g):
        x_in, t_in, w, pw = ctx.saved_tensors
        x, t, w, pw = map(opmath, (x_in, t_in, w, pw))
        s = _scale(g, ctx.reduction, x.numel())
        s = s if w is None else s * w
        dx = dt = None
        if ctx.needs_input_grad[0]:
            # dx = ((pw·t + 1 − t)·σ(x) − pw·t)·w·g/N, which is (σ(x) − t)·w·g/N without pos_weight
            if pw is None:
                dx = torch.sigmoid(x) - t
            else:
                pt = pw * t
                dx = torch.sigmoid(x).mul((pt - t).add_(1)).sub_(pt)
            dx = (dx * s).to(x_in.dtype)
        if ctx.needs_input_grad[1]:
            # dt = (log σ(−x) − pw·log σ(x))·w·g/N, which is −x·w·g/N without pos_weight
            dt = (x * -s if pw is None else torch.mul(_log_sigmoid(x), 1 - pw).sub_(x) * s).to(t_in.dtype)
        return dx, dt, None, None, None


class CustomBCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """``nn.BCEWithLogitsLoss`` computed by ``BCEWithLogitsFunction``."""

    function = BCEWithLogitsFunction

    def forward(self, input, target):
        if target.size() != input.size():
            raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
        return amp.apply(BCEWithLogitsFunction, amp.FP32, input, target, self.weight, self.pos_weight,
                         self.reduction)


registry.register(
    "bce_with_logits", native=nn.BCEWithLogitsLoss, custom=CustomBCEWithLogitsLoss, reduction=True,
    saves="x, t (inputs)",
    cases=lambda: [
        Case("bce-mean", nn.BCEWithLogitsLoss, _pair(4, 5, target="rand")),
        Case("bce-sum", lambda: nn.BCEWithLogitsLoss(reduction="sum"), _pair(4, 5, target="rand")),
        Case("bce-none", lambda: nn.BCEWithLogitsLoss(reduction="none"), _pair(2, 3, 4, target="rand")),
        Case("bce-weight", lambda: nn.BCEWithLogitsLoss(weight=_weights(0.5, 2.0, 1.0, 0.25, 3.0)),
             _pair(4, 5, target="rand")),
        Case("bce-pos-weight", lambda: nn.BCEWithLogitsLoss(pos_weight=_weights(0.5, 2.0, 1.0, 0.25, 3.0)),
             _pair(4, 5, target="rand", scale=3.0)),
        Case("bce-weight-pos-weight-none",
             lambda: nn.BCEWithLogitsLoss(weight=_weights(2.0, 0.5, 1.5, 1.0), pos_weight=_weights(3.0, 1.0, 0.5, 2.0),
                                          reduction="none"), _pair(2, 2, 4, target="rand")),
        Case("bce-extreme-logits", nn.BCEWithLogitsLoss,
             _fixed([100.0, -100.0, 100.0, -100.0, 40.0, -40.0], [1.0, 0.0, 0.0, 1.0, 0.5, 0.5]), gradcheck=False),
        Case("bce-extreme-logits-pos-weight", lambda: nn.BCEWithLogitsLoss(pos_weight=_weights(3.0), reduction="sum"),
             _fixed([100.0, -100.0, 100.0, -100.0, 40.0, -40.0], [1.0, 0.0, 0.0, 1.0, 0.5, 0.5]), gradcheck=False),
    ],
)
