"""Elementwise activations: math helpers, then the Function, then the twin, one block per op.

Native kernels are one fused pass; these twins are several torch ops, written to stay close:
- Temporaries are updated in place and few are alive at once: on CPU a fresh multi-MB tensor
  (page faults) costs more than a pass over one that is reused.
- In-place ops are limited to those with vmap batching rules (not ``clamp_(a, b)``, ``addcmul_``,
  ``lerp_``), never write a saved tensor (double backward), and never write a tensor computed
  from x or y alone with one computed from g (vmap over g), so backward ends with ``g * f``.
- Branches are chosen with float masks from ``sign`` and ``clamp`` and combined exactly (with m
  in {0, 1}, ``m*a + (1-m)*b``, ``max(m, s)`` or ``lerp(a, b, m)`` pick a or b bit for bit when
  both are finite), not with ``torch.where``: on CPU, bool tensors and ``where`` run 4-20x
  slower than a float add.
Half and bfloat16 are computed in float32 and rounded once, as native kernels do.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer import layers
from trainer.functions import amp
from trainer.layers import Case


def _randn(*shape: int, low: float = 0.05):
    """Standard-normal float64 samples kept at least ``low`` away from zero (away from kinks)."""
    def make(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return (x.sign() * x.abs().clamp_min(low) + (x == 0) * low,)
    return make


def _values(*vals: float):
    """A fixed input holding exactly ``vals`` (edge values compared with native)."""
    return lambda gen: (torch.tensor(vals, dtype=torch.float64),)


def _spread(*shape: int, scale: float, kinks: tuple[float, ...], gap: float = 0.05):
    """``scale`` * standard-normal float64 samples, each at least ``gap`` away from every kink."""
    def make(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        x = scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
        for k in kinks:
            d = x - k
            x = k + d.sign() * d.abs().clamp_min(gap) + (d == 0) * gap
        return (x,)
    return make


_EDGES = (-math.inf, -1e30, -100.0, -20.0, -3.0, -1.0, -1e-8, -0.0, 0.0, 1e-8, 1.0, 3.0, 20.0, 100.0, 1e30, math.inf)


def _up(t: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16 (native kernels compute in float32 and round once), else ``t``."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _step(t: torch.Tensor, at: float = 0.0) -> torch.Tensor:
    """Float mask: 1 where ``t > at``, else 0 (NaN gives 0); carries no gradient."""
    t = t.detach()
    return (t - at).sign_().clamp_min_(0) if at else torch.sign(t).clamp_min_(0)


# --- relu -------------------------------------------------------------------------------

def relu_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # d relu/dx = 0 where y <= 0, else 1: native's threshold_backward(g, y, 0), so 0 at x == 0 and g at NaN.
    # The 0/1 mask is float arithmetic (bool-tensor kernels run ~10x slower on some CPUs): y·max is 0 at 0
    # and >= 1 for every normal y > 0, clamped to 1, NaN -> 1. It is a constant of y (relu'' = 0): detached.
    mask = (y.detach() * torch.finfo(y.dtype).max).clamp_(max=1).nan_to_num_(nan=1.0)
    return g * mask


class ReLUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # y is the next layer's input anyway: saving it costs nothing

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return relu_backward(g, y)


class CustomReLU(nn.ReLU):
    """``nn.ReLU`` computed by ``ReLUFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = ReLUFunction

    def forward(self, x):
        return amp.apply(ReLUFunction, amp.KEEP, x)


layers.register(
    "relu", native=nn.ReLU, custom=CustomReLU, saves="y (output)",
    cases=lambda: [
        Case("relu", nn.ReLU, _randn(4, 7)),
        Case("relu-zeros", nn.ReLU, _values(-1.0, -0.0, 0.0, 0.5, 2.0, float("nan"), float("inf")), gradcheck=False),
    ],
)


# --- leaky_relu -------------------------------------------------------------------------

def _leaky_slope(t: torch.Tensor, slope: float) -> torch.Tensor:
    """1 where t > 0, else ``slope`` (also at 0 and NaN, like native), exactly; carries no gradient."""
    if 0 <= slope <= 1:  # sign(t) in {-1, 0, 1}, raised to at least slope
        return torch.sign(t.detach()).clamp_min_(slope)
    m = _step(t)
    return torch.add(m, 1 - m, alpha=slope)


def leaky_relu(x: torch.Tensor, slope: float) -> torch.Tensor:
    # y = x if x > 0 else slope * x (the same product as native, so slope 0 keeps inf and 0 * -inf is NaN)
    return _leaky_slope(x, slope).mul_(x)


def leaky_relu_backward(g: torch.Tensor, t: torch.Tensor, slope: float) -> torch.Tensor:
    # d/dx = 1 where x > 0, else slope; t is y when slope >= 0 (then y > 0 exactly where x > 0)
    return g * _leaky_slope(t, slope)


class LeakyReLUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, slope):
        return leaky_relu(_up(x), slope).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, slope = inputs
        ctx.slope = slope
        # with slope >= 0 the output, which the next layer keeps anyway, tells where x > 0
        ctx.save_for_backward(output if slope >= 0 else x)

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return leaky_relu_backward(_up(g), _up(t), ctx.slope).to(g.dtype), None


class CustomLeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` computed by ``LeakyReLUFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = LeakyReLUFunction

    def forward(self, x):
        return amp.apply(LeakyReLUFunction, amp.KEEP, x, self.negative_slope)


layers.register(
    "leaky_relu", native=nn.LeakyReLU, custom=CustomLeakyReLU,
    saves="y (output); x when negative_slope < 0",
    cases=lambda: [
        Case("leaky-3d", nn.LeakyReLU, _randn(2, 2, 3)),
        Case("leaky-slope-neg", lambda: nn.LeakyReLU(-0.3), _randn(3, 4)),  # saves x, general mask
        Case("leaky-slope0.2", lambda: nn.LeakyReLU(0.2), _randn(3, 4), gradcheck=False),  # same path as default
        Case("leaky-slope1.5", lambda: nn.LeakyReLU(1.5), _randn(3, 4), gradcheck=False),
        Case("leaky-edges", nn.LeakyReLU, _values(*_EDGES, math.nan), gradcheck=False),
        Case("leaky-slope0-edges", lambda: nn.LeakyReLU(0.0), _values(*_EDGES, math.nan), gradcheck=False),
        Case("leaky-slope-neg-edges", lambda: nn.LeakyReLU(-0.3), _values(*_EDGES, math.nan), gradcheck=False),
    ],
)


# --- elu --------------------------------------------------------------------------------

def elu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    # y = x if x > 0 else alpha * (e^x - 1), with e^x - 1 as native computes it (expm1 costs 2x exp)
    return x.clamp_min(0).add_(x.clamp_max(0).exp_().sub_(1), alpha=alpha)


def elu_backward(g: torch.Tensor, t: torch.Tensor, alpha: float, t_is_y: bool) -> torch.Tensor:
    # d/dx = 1 where x > 0, else alpha * e^x = y + alpha (alpha at x == 0, like native)
    if t_is_y and alpha <= 1:  # sign(y) is 1, 0 or -1 and y + alpha is in [0, alpha]: the larger is the slope
        return g * torch.sign(t.detach()).clamp_min_(t.clamp_max(0).add_(alpha))
    neg = t.clamp_max(0).add_(alpha) if t_is_y else torch.exp(t.clamp_max(0)) * alpha
    return g * torch.lerp(neg, neg.new_ones(()), _step(t))  # lerp with weight 0 or 1 picks exactly


class ELUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, alpha):
        return elu(_up(x), alpha).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, alpha = inputs
        # with alpha >= 0, y > 0 exactly where x > 0 and y + alpha = alpha * e^x below
        ctx.alpha, ctx.t_is_y = alpha, alpha >= 0
        ctx.save_for_backward(output if ctx.t_is_y else x)

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return elu_backward(_up(g), _up(t), ctx.alpha, ctx.t_is_y).to(g.dtype), None


class CustomELU(nn.ELU):
    """``nn.ELU`` computed by ``ELUFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = ELUFunction

    def forward(self, x):
        return amp.apply(ELUFunction, amp.KEEP, x, self.alpha)


# NaN is left out of the edge cases: native's vectorized and scalar loops disagree on its grad
layers.register(
    "elu", native=nn.ELU, custom=CustomELU, saves="y (output); x when alpha < 0",
    cases=lambda: [
        Case("elu-3d", nn.ELU, _randn(2, 2, 3)),
        Case("elu-alpha-neg", lambda: nn.ELU(alpha=-0.5), _randn(3, 4)),  # saves x
        Case("elu-alpha2", lambda: nn.ELU(alpha=2.0), _randn(3, 4)),  # saves y, lerp instead of max
        Case("elu-edges", nn.ELU, _values(*_EDGES), gradcheck=False),
        Case("elu-alpha2-edges", lambda: nn.ELU(alpha=2.0), _values(*_EDGES), gradcheck=False),
        Case("elu-alpha-neg-edges", lambda: nn.ELU(alpha=-0.5), _values(*_EDGES), gradcheck=False),
    ],
)


# --- gelu -------------------------------------------------------------------------------

_SQRT1_2 = 1 / math.sqrt(2)             # 'none': Phi(x) = (1 + erf(x / sqrt 2)) / 2
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)  # phi(x) = e^(-x^2/2) / sqrt(2 pi)
_TANH_BETA = math.sqrt(2 / math.pi)     # 'tanh': z = beta * (x + kappa x^3)
_TANH_KAPPA = 0.044715


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "tanh":
        # y = x/2 (1 + tanh z) = x sigmoid(2z), with 2z = 2 beta (x + kappa x^3)
        return (x * x).mul_(2 * _TANH_BETA * _TANH_KAPPA).add_(2 * _TANH_BETA).mul_(x).sigmoid_().mul_(x)
    # y = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2
    return (x * _SQRT1_2).erf_().add_(1).mul_(x).mul_(0.5)


def _gelu_slope(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) + x phi(x), in a helper so that its temporaries are freed before ``g *`` it is allocated."""
    x_pdf = (x * x).mul_(-0.5).exp_().mul(x)  # sqrt(2 pi) x phi(x)
    return (x * _SQRT1_2).erf_().add_(1).mul_(0.5).add_(x_pdf, alpha=_INV_SQRT_2PI)


def gelu_backward(g: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "tanh":
        # d/dx x s(2z) = s + x s (1 - s) 2z' = s (1 + (1 - s) w), s = sigmoid(2z), w = 2 beta (x + 3 kappa x^3)
        x2 = x * x
        s = (x2 * (2 * _TANH_BETA * _TANH_KAPPA)).add_(2 * _TANH_BETA).mul_(x).sigmoid_()
        w = x2.mul_(6 * _TANH_BETA * _TANH_KAPPA).add_(2 * _TANH_BETA).mul_(x)
        return torch.lerp(g, g.new_zeros(()), s).mul_(w).add_(g).mul_(s)  # (g (1 - s) w + g) s
    # d/dx x Phi(x) = Phi(x) + x phi(x)
    return g * _gelu_slope(x)


class GELUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, approximate):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        return gelu(_up(x), approximate).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.approximate = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return gelu_backward(_up(g), _up(x), ctx.approximate).to(g.dtype), None


class CustomGELU(nn.GELU):
    """``nn.GELU`` (both ``approximate`` modes) computed by ``GELUFunction``."""

    function = GELUFunction

    def forward(self, x):
        return amp.apply(GELUFunction, amp.KEEP, x, self.approximate)


_GELU_EDGES = (-math.inf, -1e30, -1e4, -40.0, -10.0, -5.0, -1.0, -0.0, 0.0, 0.5, 5.0, 10.0, 40.0, 1e4, math.inf,
               math.nan)

layers.register(
    "gelu", native=nn.GELU, custom=CustomGELU, saves="x (input)",
    cases=lambda: [
        Case("gelu", nn.GELU, _spread(3, 4, scale=2.0, kinks=())),
        Case("gelu-tanh-3d", lambda: nn.GELU(approximate="tanh"), _spread(2, 2, 3, scale=2.0, kinks=())),
        Case("gelu-edges", nn.GELU, _values(*_GELU_EDGES), gradcheck=False),
        Case("gelu-tanh-edges", lambda: nn.GELU(approximate="tanh"), _values(*_GELU_EDGES), gradcheck=False),
    ],
)


# --- silu -------------------------------------------------------------------------------

def silu(x: torch.Tensor) -> torch.Tensor:
    # y = x sigmoid(x)
    return torch.sigmoid(x).mul_(x)


def silu_backward(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # d/dx x s(x) = s (1 + x (1 - s)), with s = sigmoid(x)
    s = torch.sigmoid(x)
    return torch.lerp(g, g.new_zeros(()), s).mul_(x).add_(g).mul_(s)  # (g (1 - s) x + g) s


class SiLUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return silu(_up(x)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return silu_backward(_up(g), _up(x)).to(g.dtype)


class CustomSiLU(nn.SiLU):
    """``nn.SiLU`` computed by ``SiLUFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = SiLUFunction

    def forward(self, x):
        return amp.apply(SiLUFunction, amp.KEEP, x)


layers.register(
    "silu", native=nn.SiLU, custom=CustomSiLU, saves="x (input)",
    cases=lambda: [
        Case("silu-3d", nn.SiLU, _spread(2, 2, 3, scale=3.0, kinks=())),
        Case("silu-edges", nn.SiLU, _values(*_EDGES, math.nan), gradcheck=False),
    ],
)


# --- mish -------------------------------------------------------------------------------

# tanh(softplus x) = n / (n + 2) with n = e^x (e^x + 2). Above x = 20 it is 1 in float64
# (2/n < 2^-53), so e^x is capped there and nothing overflows (e^x itself would above 88 in fp32).
_MISH_CAP = 20.0


def mish(x: torch.Tensor) -> torch.Tensor:
    # y = x tanh(softplus x) = x n / (n + 2)
    e = x.clamp_max(_MISH_CAP).exp_()
    n = (e + 2).mul_(e)
    return n.div_(n + 2).mul_(x)


def mish_backward(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # d/dx = T + x sigmoid(x) (1 - T^2), T = n/d, d = n + 2: = (n + 4 x e (e + 1) / d) / d
    xc = x.clamp_max(_MISH_CAP)  # above the cap the second term is below float64 resolution
    e = torch.exp(xc)
    n = (e + 2).mul_(e)
    d = n + 2
    return g * (n - e).mul_(xc).div_(d).mul_(4).add_(n).div_(d)


class MishFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return mish(_up(x)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return mish_backward(_up(g), _up(x)).to(g.dtype)


class CustomMish(nn.Mish):
    """``nn.Mish`` computed by ``MishFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = MishFunction

    def forward(self, x):
        return amp.apply(MishFunction, amp.KEEP, x)


# +inf is left out of the edge cases: native's grad there is NaN (inf * 0), the twin's is 1
layers.register(
    "mish", native=nn.Mish, custom=CustomMish, saves="x (input)",
    cases=lambda: [
        Case("mish-3d", nn.Mish, _spread(2, 2, 3, scale=3.0, kinks=())),
        Case("mish-edges", nn.Mish, _values(*_EDGES[:-1], -1.19, 19.99, 20.01, 50.0, 88.0, 89.0, math.nan),
             gradcheck=False),
    ],
)


# --- softplus ---------------------------------------------------------------------------

def _max_exponent(lim: torch.finfo) -> float:
    """A little below log(max float): e^v stays finite (native overflows to inf beyond it anyway)."""
    return math.log(lim.max) * (1 - 1e-6)


def softplus(x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    # y = x if beta x > threshold else log(1 + e^(beta x)) / beta
    v = x * beta if beta != 1 else x
    m = _step(v, threshold)  # 1 where y = x
    # e^v is capped so that the log branch is finite where it is not taken and 0 * it vanishes
    cap = min(threshold, _max_exponent(torch.finfo(x.dtype)))
    sp = (v.clamp_max_(cap) if beta != 1 else x.clamp_max(cap)).exp_().log1p_()
    if beta != 1:
        sp.div_(beta)
    sp.mul_(m.neg_().add_(1))  # sp (1 - m), flipping m in place rather than holding another tensor
    # x m is NaN only for an infinite x where m = 0 (0 * inf), and must be 0 there
    return sp.add_(m.neg_().add_(1).mul_(x).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf))


def _softplus_slope(x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    """1 where beta x > threshold, else sigmoid(beta x) (a helper: its temporaries die before ``g *`` it)."""
    v = x * beta if beta != 1 else x
    m = _step(v, threshold)
    s = v.sigmoid_() if beta != 1 else torch.sigmoid(x)  # v is a temporary unless beta == 1
    return m.clamp_min_(s)  # max(m, s) is 1 where m = 1, else s, since 0 <= s <= 1


def softplus_backward(g: torch.Tensor, x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    # d/dx = 1 if beta x > threshold else sigmoid(beta x) = e^(beta x) / (e^(beta x) + 1)
    return g * _softplus_slope(x, beta, threshold)


class SoftplusFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, beta, threshold):
        return softplus(_up(x), beta, threshold).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.beta, ctx.threshold = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return softplus_backward(_up(g), _up(x), ctx.beta, ctx.threshold).to(g.dtype), None, None


class CustomSoftplus(nn.Softplus):
    """``nn.Softplus`` computed by ``SoftplusFunction``; like native, float32 under CUDA autocast."""

    function = SoftplusFunction

    def forward(self, x):
        return amp.apply(SoftplusFunction, amp.FP32_ON_CUDA, x, self.beta, self.threshold)


layers.register(
    "softplus", native=nn.Softplus, custom=CustomSoftplus, saves="x (input)",
    cases=lambda: [
        Case("softplus", nn.Softplus, _spread(3, 4, scale=3.0, kinks=())),
        Case("softplus-beta2-thr5-3d", lambda: nn.Softplus(beta=2.0, threshold=5.0),
             _spread(2, 2, 3, scale=3.0, kinks=(2.5,))),
        Case("softplus-edges", nn.Softplus, _values(*_EDGES, 19.99, 20.01, 88.0, 89.0, math.nan), gradcheck=False),
        Case("softplus-beta2-thr5-edges", lambda: nn.Softplus(beta=2.0, threshold=5.0),
             _values(*_EDGES, 2.4999, 2.5, 2.5001, math.nan), gradcheck=False),
    ],
)


# --- sigmoid ----------------------------------------------------------------------------

def sigmoid(x: torch.Tensor) -> torch.Tensor:
    # y = 1 / (1 + e^-x); e^-x = inf for very negative x gives exactly 0, no NaN
    return x.neg().exp_().add_(1).reciprocal_()


def sigmoid_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # d/dx = y (1 - y); lerp(g, 0, y) = g (1 - y), exact also for y near 1
    return torch.lerp(g, y.new_zeros(()), y).mul_(y)


class SigmoidFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return sigmoid(_up(x)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # the derivative needs y only, which the next layer keeps anyway

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return sigmoid_backward(_up(g), _up(y)).to(g.dtype)


class CustomSigmoid(nn.Sigmoid):
    """``nn.Sigmoid`` computed by ``SigmoidFunction``."""

    function = SigmoidFunction

    def forward(self, x):
        return amp.apply(SigmoidFunction, amp.KEEP, x)


layers.register(
    "sigmoid", native=nn.Sigmoid, custom=CustomSigmoid, saves="y (output)",
    cases=lambda: [
        Case("sigmoid-3d", nn.Sigmoid, _spread(2, 2, 3, scale=3.0, kinks=())),
        Case("sigmoid-edges", nn.Sigmoid, _values(*_EDGES, math.nan), gradcheck=False),
    ],
)


# --- tanh -------------------------------------------------------------------------------

def tanh(x: torch.Tensor) -> torch.Tensor:
    # tanh|x| = -u / (u + 2) with u = e^(-2|x|) - 1 in (-1, 0]: no overflow, no cancellation near 0
    u = x.abs().mul_(-2).expm1_()
    return u.div_(u + 2).copysign_(x)


def tanh_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # d/dx = 1 - y^2; lerp(g, 0, w) = g (1 - w)
    return torch.lerp(g, y.new_zeros(()), y * y)


class TanhFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return tanh(_up(x)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # the derivative needs y only, which the next layer keeps anyway

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return tanh_backward(_up(g), _up(y)).to(g.dtype)


class CustomTanh(nn.Tanh):
    """``nn.Tanh`` computed by ``TanhFunction``."""

    function = TanhFunction

    def forward(self, x):
        return amp.apply(TanhFunction, amp.KEEP, x)


layers.register(
    "tanh", native=nn.Tanh, custom=CustomTanh, saves="y (output)",
    cases=lambda: [
        Case("tanh-3d", nn.Tanh, _spread(2, 2, 3, scale=2.0, kinks=())),
        Case("tanh-edges", nn.Tanh, _values(*_EDGES, 1e-4, -1e-4, 0.3, math.nan), gradcheck=False),
    ],
)


# --- hardsigmoid ------------------------------------------------------------------------

def hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    # y = min(max(x + 3, 0), 6) / 6
    return x.clamp(-3, 3).add_(3).div_(6)


def _hardsigmoid_slope(x: torch.Tensor) -> torch.Tensor:
    """1/6 on the open interval (-3, 3), else 0 (NaN too): sign(|x| - 3) is -1 there, else 0 or 1."""
    return x.detach().abs().sub_(3).sign_().clamp_max_(0).mul_(-1 / 6)


def hardsigmoid_backward(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # d/dx = 1/6 on the open interval (-3, 3), else 0 (also at -3 and 3, like native)
    return g * _hardsigmoid_slope(x)


class HardsigmoidFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return hardsigmoid(_up(x)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # the input, not y: in float32, x + 3 rounds to 6 just below x = 3, where the grad is still 1/6
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return hardsigmoid_backward(_up(g), _up(x)).to(g.dtype)


class CustomHardsigmoid(nn.Hardsigmoid):
    """``nn.Hardsigmoid`` computed by ``HardsigmoidFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = HardsigmoidFunction

    def forward(self, x):
        return amp.apply(HardsigmoidFunction, amp.KEEP, x)


_BELOW_3 = 3 - 2**-22  # the float32 just below 3
_HARD_EDGES = (-math.inf, -1e30, -4.0, -3.0001, -3.0, -_BELOW_3, -2.9999, -0.0, 0.0, 2.9999, _BELOW_3, 3.0, 3.0001, 4.0,
               1e30, math.inf)

layers.register(
    "hardsigmoid", native=nn.Hardsigmoid, custom=CustomHardsigmoid, saves="x (input)",
    cases=lambda: [
        Case("hardsigmoid-3d", nn.Hardsigmoid, _spread(2, 2, 4, scale=3.0, kinks=(-3.0, 3.0))),
        Case("hardsigmoid-edges", nn.Hardsigmoid, _values(*_HARD_EDGES, math.nan), gradcheck=False),
    ],
)


# --- hardswish --------------------------------------------------------------------------

def hardswish(x: torch.Tensor) -> torch.Tensor:
    # y = x min(max(x + 3, 0), 6) / 6
    return x.clamp(-3, 3).add_(3).mul_(x).div_(6)


def hardswish_backward(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # d/dx = 0 up to -3, x/3 + 1/2 on (-3, 3), 1 from 3 on (native: 0 at -3, 1 at 3).
    # clamp(x, -3, 3)/3 + 1/2 is right on (-3, 3) and 1/2 too low below it, too high above it,
    # where x - clamp(x, -b, b), b the float just below 3, is negative or positive (0 between).
    b = 3 - 2 * torch.finfo(x.dtype).eps
    xd = x.detach()
    slope = x.clamp(-3, 3).div_(3).add_(0.5)
    return g * slope.add_(xd.clamp(-b, b).sub_(xd).sign_(), alpha=0.5)


class HardswishFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return hardswish(_up(x)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return hardswish_backward(_up(g), _up(x)).to(g.dtype)


class CustomHardswish(nn.Hardswish):
    """``nn.Hardswish`` computed by ``HardswishFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = HardswishFunction

    def forward(self, x):
        return amp.apply(HardswishFunction, amp.KEEP, x)


# NaN is left out of the edge cases: native's vectorized and scalar loops disagree on its grad
layers.register(
    "hardswish", native=nn.Hardswish, custom=CustomHardswish, saves="x (input)",
    cases=lambda: [
        Case("hardswish-3d", nn.Hardswish, _spread(2, 2, 4, scale=3.0, kinks=(-3.0, 3.0))),
        Case("hardswish-edges", nn.Hardswish, _values(*_HARD_EDGES), gradcheck=False),
    ],
)
