"""Elementwise activations: math helpers, then the Function, then the twin, one block per op.

Native kernels are one fused pass; these twins are several torch ops, written to stay close:
- Few ops: on 1e4 elements each op costs about as much in dispatch as in arithmetic, so the
  formulas are arranged for the fewest ops, and numbers that arithmetic ops take are 0-dim
  tensors made once per dtype (``_Consts``), since a Python number is wrapped in a fresh
  tensor on every call (~2.5 µs, as much as the op). ``clamp`` takes its bounds as they are.
- Few fresh tensors: on CPU a fresh multi-MB tensor (page faults) costs more than a pass over
  one that is reused, so temporaries are updated in place, and backward multiplies g into
  its own temporary (``_times``) wherever that is safe.
- In-place ops are limited to those with vmap batching rules (not ``clamp_(a, b)``, ``addcmul_``,
  ``lerp_``, ``square_``) and never write a saved tensor (double backward). Where ``_owned()``
  (nothing recorded, transformed or compiled), a fused op may write a fresh temporary through
  ``out=`` instead (``add(c, t, alpha=a, out=t)`` is c + a t in one pass; ``addcmul(t, u, v, out=t)``);
  elsewhere the same formula runs as plain ops.
- Branches are chosen with float masks from ``sign``, ``clamp`` and float overflow, combined
  exactly (with m in {0, 1}, ``max(m, s)`` picks 1 or s, ``max(v - m * big, x)`` picks v or x),
  not with ``torch.where``: on CPU, bool tensors and ``where`` run 4-20x slower than a float add.
Half and bfloat16 are computed in float32 and rounded once, as native kernels do.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.twins import amp, cases, registry
from trainer.twins.amp import LOW
from trainer.twins.registry import Case


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


class _Consts:
    """The numbers ``make(dtype)`` as 0-dim tensors, for arithmetic with a tensor of that dtype.

    An arithmetic op given a Python number wraps it in a fresh 0-dim tensor on every call
    (~2.5 µs, as much as the op itself on 1e4 elements); a 0-dim CPU tensor is taken as a
    scalar operand as it is. Those for float32 and float64 on CPU are made once, here; those
    for another dtype or device on first use, then kept: made at every call on a GPU, each
    would be a host-to-device copy that waits for the device, a sync per constant per call.
    Nothing made while compiling or under a fake-tensor mode is kept.
    """

    def __init__(self, make):
        self.make = make
        self.cpu = {dt: tuple(torch.tensor(v, dtype=dt) for v in make(dt)) for dt in (torch.float32, torch.float64)}
        self.kept: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def of(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = self.cpu.get(t.dtype) if t.is_cpu else self.kept.get((t.dtype, t.device))
        if k is None:
            k = tuple(torch.tensor(v, dtype=t.dtype, device=t.device) for v in self.make(t.dtype))
            if not torch.compiler.is_compiling() and all(type(c) is torch.Tensor for c in k):
                self.kept[(t.dtype, t.device)] = k
        return k


_NONE = _Consts(lambda dt: ())


def _compute(fn, consts: _Consts, t: torch.Tensor, *args):
    """``fn(t, *args, k)`` with k the constants for t's dtype; half and bfloat16 tensors are computed
    in float32 and the result rounded once, as native kernels do. (One call layer: on 1e4
    elements each Python frame and check between the Function and its ops is measurable.)
    """
    if t.dtype in LOW:
        t, low = t.float(), t.dtype
        return fn(t, *(a.float() if isinstance(a, torch.Tensor) else a for a in args), consts.of(t)).to(low)
    k = consts.cpu.get(t.dtype) if t.is_cpu else None
    return fn(t, *args, k if k is not None else consts.of(t))


def _owned(g: torch.Tensor | None = None) -> bool:
    """Whether a fresh temporary may be written in place or through ``out=``: grad mode off (nothing
    is recorded; with create_graph the ops are recorded as usual), no torch.func transform active
    (its tensors may be batched), nothing being compiled, and, when a result takes ``g``, g not
    batched by ``autograd.grad(is_grads_batched=True)`` (as gradcheck does): a batched value cannot
    be written into an unbatched tensor.
    """
    return not (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
                or torch.compiler.is_compiling() or g is not None and torch._C._functorch.is_legacy_batchedtensor(g))


def _times(g: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``g * f``, written into ``f``, a fresh temporary the caller owns, where ``_owned(g)``."""
    return f.mul_(g) if _owned(g) else g * f


def _step(t: torch.Tensor, at: float = 0.0) -> torch.Tensor:
    """Float mask: 1 where ``t > at``, else 0 (NaN gives 0); carries no gradient."""
    t = t.detach()
    return (t - at).sign_().clamp_min_(0) if at else torch.sign(t).clamp_min_(0)


# --- relu -------------------------------------------------------------------------------

def relu_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # d relu/dx = 0 where y <= 0, else 1: native's threshold_backward(g, y, 0), so 0 at x == 0 and g at NaN.
    # The 0/1 mask is float arithmetic (bool-tensor kernels run ~10x slower on some CPUs): y >= 0, so
    # sign(y) is 1 for every y > 0 (subnormals too) and 0 at 0; NaN is made 1 first (sign(NaN) is 0).
    # It is a constant of y (relu'' = 0): detached.
    return _times(g, y.detach().nan_to_num(1.0).sign_())


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


registry.register(
    "relu", native=nn.ReLU, custom=CustomReLU, saves="y (output)",
    cases=cases.relu,
)


# --- leaky_relu -------------------------------------------------------------------------

def _leaky_slope(t: torch.Tensor, slope: float) -> torch.Tensor:
    """1 where t > 0, else ``slope`` (also at 0 and NaN, like native), exactly; carries no gradient."""
    if 0 <= slope <= 1:  # sign(t) in {-1, 0, 1}, raised to at least slope
        return torch.sign(t.detach()).clamp_min_(slope)
    m = _step(t)
    return torch.add(m, 1 - m, alpha=slope)


def leaky_relu(x: torch.Tensor, slope: float, k=()) -> torch.Tensor:
    # y = x if x > 0 else slope * x, the same product as native. For slope <= 1 (negative too) that
    # is the larger of x and slope * x, for slope > 1 the smaller; slope 0 keeps x = inf (0 * inf
    # is NaN) by a 0/1 mask, and gives NaN at -inf like native.
    if slope == 0:
        return torch.sign(x).clamp_min_(0).mul_(x)
    xs = x.mul(slope)
    return xs.clamp_min_(x) if slope < 1 else xs.clamp_max_(x)


def leaky_relu_backward(g: torch.Tensor, t: torch.Tensor, slope: float, k=()) -> torch.Tensor:
    # d/dx = 1 where x > 0, else slope; t is y when slope >= 0 (then y > 0 exactly where x > 0)
    return _times(g, _leaky_slope(t, slope))


class LeakyReLUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, slope):
        return _compute(leaky_relu, _NONE, x, slope)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, slope = inputs
        ctx.slope = slope
        # with slope >= 0 the output, which the next layer keeps anyway, tells where x > 0
        ctx.save_for_backward(output if slope >= 0 else x)

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return _compute(leaky_relu_backward, _NONE, g, t, ctx.slope), None


class CustomLeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` computed by ``LeakyReLUFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = LeakyReLUFunction

    def forward(self, x):
        return amp.apply(LeakyReLUFunction, amp.KEEP, x, self.negative_slope)


registry.register(
    "leaky_relu", native=nn.LeakyReLU, custom=CustomLeakyReLU,
    saves="y (output); x when negative_slope < 0",
    cases=cases.leaky_relu,
)


# --- elu --------------------------------------------------------------------------------

_ELU = _Consts(lambda dt: (1.0,))


def elu(x: torch.Tensor, alpha: float, k) -> torch.Tensor:
    # y = x if x > 0 else alpha * (e^x - 1), with e^x - 1 as native computes it (expm1 costs 2x exp)
    (one,) = k
    neg = x.clamp_max(0).exp_().sub_(one)
    if 0 <= alpha <= 1:  # alpha (e^min(x, 0) - 1) is 0 for x > 0 and >= x for x <= 0: the larger of the two
        return (neg.mul_(alpha) if alpha != 1 else neg).clamp_min_(x)
    return x.clamp_min(0).add_(neg, alpha=alpha)


def elu_backward(g: torch.Tensor, t: torch.Tensor, alpha: float, t_is_y: bool, k) -> torch.Tensor:
    # d/dx = 1 where x > 0, else alpha * e^x = y + alpha (alpha at x == 0, like native)
    if t_is_y and alpha == 1:  # y + 1 is above 1 exactly where y > 0
        (one,) = k
        return _times(g, (t + one).clamp_max_(1))
    if t_is_y and alpha <= 1:  # sign(y) is 1, 0 or -1 and y + alpha is in [0, alpha]: the larger is the slope
        return _times(g, torch.sign(t.detach()).clamp_min_(t.clamp_max(0).add_(alpha)))
    neg = t.clamp_max(0).add_(alpha) if t_is_y else torch.exp(t.clamp_max(0)) * alpha
    return g * torch.lerp(neg, neg.new_ones(()), _step(t))  # lerp with weight 0 or 1 picks exactly


class ELUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, alpha):
        return _compute(elu, _ELU, x, alpha)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, alpha = inputs
        # with alpha >= 0, y > 0 exactly where x > 0 and y + alpha = alpha * e^x below
        ctx.alpha, ctx.t_is_y = alpha, alpha >= 0
        ctx.save_for_backward(output if ctx.t_is_y else x)

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return _compute(elu_backward, _ELU, g, t, ctx.alpha, ctx.t_is_y), None


class CustomELU(nn.ELU):
    """``nn.ELU`` computed by ``ELUFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = ELUFunction

    def forward(self, x):
        return amp.apply(ELUFunction, amp.KEEP, x, self.alpha)


# NaN is left out of the edge cases: native's vectorized and scalar loops disagree on its grad
registry.register(
    "elu", native=nn.ELU, custom=CustomELU, saves="y (output); x when alpha < 0",
    cases=cases.elu,
)


# --- gelu -------------------------------------------------------------------------------

_SQRT1_2 = 1 / math.sqrt(2)             # 'none': Phi(x) = (1 + erf(x / sqrt 2)) / 2
_TANH_BETA = math.sqrt(2 / math.pi)     # 'tanh': z = beta * (x + kappa x^3)
_TANH_KAPPA = 0.044715
_LOG2E = 1 / math.log(2)
# 0, 1, 1/2, 1/sqrt 2, log2 (1/sqrt(2 pi)), 2 beta
_GELU = _Consts(lambda dt: (0.0, 1.0, 0.5, _SQRT1_2, -math.log2(math.sqrt(2 * math.pi)), 2 * _TANH_BETA))


def _phi_of_erf(e: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Phi = (1 + e) / 2 = 1/2 + e/2, written into the fresh temporary e: one pass where ``_owned()``."""
    return torch.add(half, e, alpha=0.5, out=e) if _owned() else e.mul_(half).add_(half)


def gelu(x: torch.Tensor, approximate: str, k) -> torch.Tensor:
    _, one, half, sqrt1_2, _, two_beta = k
    if approximate == "tanh":
        # y = x/2 (1 + tanh z) = x sigmoid(2z), with 2z = 2 beta (1 + kappa x^2) x
        return torch.addcmul(two_beta, x, x, value=2 * _TANH_BETA * _TANH_KAPPA).mul_(x).sigmoid_().mul_(x)
    # y = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2
    return _phi_of_erf(x.mul(sqrt1_2).erf_(), half).mul_(x)


def gelu_backward(g: torch.Tensor, x: torch.Tensor, approximate: str, k) -> torch.Tensor:
    zero, one, half, sqrt1_2, log2_c, two_beta = k  # log2_c = log2 (1/sqrt(2 pi))
    if approximate == "tanh":
        # d/dx x s(2z) = s + x s (1 - s) 2z' = s (1 + (1 - s) w), s = sigmoid(2z), w = 2 beta (x + 3 kappa x^3)
        s = torch.addcmul(two_beta, x, x, value=2 * _TANH_BETA * _TANH_KAPPA).mul_(x).sigmoid_()
        w = torch.addcmul(two_beta, x, x, value=6 * _TANH_BETA * _TANH_KAPPA).mul_(x)
        return torch.lerp(g, zero, s).mul_(w).add_(g).mul_(s)  # (g (1 - s) w + g) s
    # d/dx x Phi(x) = Phi(x) + x phi(x), with Phi(x) = (1 + erf(x / sqrt 2)) / 2 and
    # phi(x) = e^(-x^2/2) / sqrt(2 pi) = 2^(log2 (1/sqrt(2 pi)) - x^2 log2(e) / 2) (exp2 is ~2x cheaper than exp)
    cdf = _phi_of_erf(x.mul(sqrt1_2).erf_(), half)
    if _owned() and x.is_cpu and x.numel() >= _GELU_CHUNKED and x.is_contiguous():
        return _times(g, _add_x_pdf_chunked(cdf, x, log2_c))
    pdf = torch.addcmul(log2_c, x, x, value=-_LOG2E / 2).exp2_()
    # Phi + x phi in one pass, into cdf where owned (exp2's backward keeps pdf: it is never written)
    slope = torch.addcmul(cdf, pdf, x, out=cdf) if _owned() else torch.addcmul(cdf, pdf, x)
    return _times(g, slope)


# On CPU a second fresh multi-MB temporary for phi costs as much as the passes over it (page faults,
# and the passes then run from memory): from _GELU_CHUNKED elements on, phi is made a block of
# _GELU_CHUNK at a time in one reused L2-sized buffer (only where owned: the same ops, block by block).
_GELU_CHUNK = 1 << 16
_GELU_CHUNKED = 1 << 19


def _add_x_pdf_chunked(cdf: torch.Tensor, x: torch.Tensor, log2_c: torch.Tensor) -> torch.Tensor:
    """cdf + x phi(x), written into cdf (fresh, contiguous, shaped as x), phi made a block at a time."""
    flat_x, flat_c = x.view(-1), cdf.view(-1)
    n = flat_x.numel()
    buf = torch.empty(_GELU_CHUNK, dtype=x.dtype, device=x.device)
    for i in range(0, n, _GELU_CHUNK):
        xs, cs = flat_x[i:i + _GELU_CHUNK], flat_c[i:i + _GELU_CHUNK]
        pdf = buf if xs.numel() == _GELU_CHUNK else buf[:xs.numel()]
        torch.addcmul(log2_c, xs, xs, value=-_LOG2E / 2, out=pdf).exp2_()
        torch.addcmul(cs, pdf, xs, out=cs)
    return cdf


class GELUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, approximate):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        return _compute(gelu, _GELU, x, approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.approximate = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _compute(gelu_backward, _GELU, g, x, ctx.approximate), None


class CustomGELU(nn.GELU):
    """``nn.GELU`` (both ``approximate`` modes) computed by ``GELUFunction``."""

    function = GELUFunction

    def forward(self, x):
        return amp.apply(GELUFunction, amp.KEEP, x, self.approximate)


_GELU_EDGES = (-math.inf, -1e30, -1e4, -40.0, -10.0, -5.0, -1.0, -0.0, 0.0, 0.5, 5.0, 10.0, 40.0, 1e4, math.inf,
               math.nan)

registry.register(
    "gelu", native=nn.GELU, custom=CustomGELU, saves="x (input)",
    cases=cases.gelu,
)


# --- silu -------------------------------------------------------------------------------

_ZERO_ONE = _Consts(lambda dt: (0.0, 1.0))


def silu(x: torch.Tensor, k) -> torch.Tensor:
    # y = x sigmoid(x)
    return torch.sigmoid(x).mul_(x)


def silu_backward(g: torch.Tensor, x: torch.Tensor, k) -> torch.Tensor:
    # d/dx x s(x) = s (1 + x (1 - s)), with s = sigmoid(x)
    zero, _ = k
    s = torch.sigmoid(x)
    return torch.lerp(g, zero, s).mul_(x).add_(g).mul_(s)  # (g (1 - s) x + g) s


class SiLUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return _compute(silu, _NONE, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _compute(silu_backward, _ZERO_ONE, g, x)


class CustomSiLU(nn.SiLU):
    """``nn.SiLU`` computed by ``SiLUFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = SiLUFunction

    def forward(self, x):
        return amp.apply(SiLUFunction, amp.KEEP, x)


registry.register(
    "silu", native=nn.SiLU, custom=CustomSiLU, saves="x (input)",
    cases=cases.silu,
)


# --- mish -------------------------------------------------------------------------------

# tanh(softplus x) = n / (n + 2) with n = e^x (e^x + 2). Above x = 20 it is 1 in float64
# (2/n < 2^-53), so e^x is capped there and nothing overflows (e^x itself would above 88 in fp32).
_MISH_CAP = 20.0
_MISH = _Consts(lambda dt: (2.0, 4.0))


def mish(x: torch.Tensor, k) -> torch.Tensor:
    # y = x tanh(softplus x) = x n / (n + 2)
    two, _ = k
    e = x.clamp_max(_MISH_CAP).exp_()
    n = (e + two).mul_(e)
    return n.div_(n + two).mul_(x)


def mish_backward(g: torch.Tensor, x: torch.Tensor, k) -> torch.Tensor:
    # d/dx = T + x sigmoid(x) (1 - T^2), T = n/d, d = n + 2: = (n + 4 x e (e + 1) / d) / d
    two, four = k
    xc = x.clamp_max(_MISH_CAP)  # above the cap the second term is below float64 resolution
    e = torch.exp(xc)
    n = (e + two).mul_(e)
    d = n + two
    return _times(g, (n - e).mul_(xc).div_(d).mul_(four).add_(n).div_(d))  # n - e = e (e + 1)


class MishFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return _compute(mish, _MISH, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _compute(mish_backward, _MISH, g, x)


class CustomMish(nn.Mish):
    """``nn.Mish`` computed by ``MishFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = MishFunction

    def forward(self, x):
        return amp.apply(MishFunction, amp.KEEP, x)


# +inf is left out of the edge cases: native's grad there is NaN (inf * 0), the twin's is 1
registry.register(
    "mish", native=nn.Mish, custom=CustomMish, saves="x (input)",
    cases=cases.mish,
)


# --- softplus ---------------------------------------------------------------------------

def _max_exponent(lim: torch.finfo) -> float:
    """A little below log(max float): e^v stays finite (native overflows to inf beyond it anyway)."""
    return math.log(lim.max) * (1 - 1e-6)


_SOFTPLUS = _Consts(lambda dt: (torch.finfo(dt).max, -torch.finfo(dt).max))  # the largest float, negated


def _above(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """Float mask of ``v > threshold``: -1 there, else 0 (NaN and -inf too, where v - v is NaN)."""
    return v.clamp_max(threshold).sub_(v).sign_()


def softplus(x: torch.Tensor, beta: float, threshold: float, k) -> torch.Tensor:
    # y = x if beta x > threshold else log(1 + e^(beta x)) / beta
    v = x.mul(beta) if beta != 1 else x
    if beta > 0 and threshold >= 0:
        # Where beta x > threshold, the exponent is pushed to about -max, so the log branch is 0 there,
        # below x > threshold / beta >= 0; elsewhere log(1 + e^v) / beta >= x. The larger of the two is y.
        big, _ = k
        sp = _above(v, threshold).mul_(big).add_(v).exp_().log1p_()
        return (sp.div_(beta) if beta != 1 else sp).clamp_min_(x)
    m = _step(v, threshold)  # 1 where y = x
    # e^v is capped so that the log branch is finite where it is not taken and 0 * it vanishes
    cap = min(threshold, _max_exponent(torch.finfo(x.dtype)))
    sp = (v.clamp_max_(cap) if beta != 1 else x.clamp_max(cap)).exp_().log1p_()
    if beta != 1:
        sp.div_(beta)
    sp.mul_(m.neg_().add_(1))  # sp (1 - m), flipping m in place rather than holding another tensor
    # x m is NaN only for an infinite x where m = 0 (0 * inf), and must be 0 there
    return sp.add_(m.neg_().add_(1).mul_(x).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf))


def softplus_backward(g: torch.Tensor, x: torch.Tensor, beta: float, threshold: float, k) -> torch.Tensor:
    # d/dx = 1 if beta x > threshold else sigmoid(beta x): sigmoid(beta x + max), exactly 1, where above
    _, neg_big = k
    v = x.mul(beta) if beta != 1 else x
    return _times(g, _above(v, threshold).mul_(neg_big).add_(v).sigmoid_())


class SoftplusFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, beta, threshold):
        return _compute(softplus, _SOFTPLUS, x, beta, threshold)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.beta, ctx.threshold = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _compute(softplus_backward, _SOFTPLUS, g, x, ctx.beta, ctx.threshold), None, None


class CustomSoftplus(nn.Softplus):
    """``nn.Softplus`` computed by ``SoftplusFunction``; like native, float32 under CUDA autocast."""

    function = SoftplusFunction

    def forward(self, x):
        return amp.apply(SoftplusFunction, amp.FP32_ON_CUDA, x, self.beta, self.threshold)


registry.register(
    "softplus", native=nn.Softplus, custom=CustomSoftplus, saves="x (input)",
    cases=cases.softplus,
)


# --- sigmoid ----------------------------------------------------------------------------

def sigmoid(x: torch.Tensor, k) -> torch.Tensor:
    # y = 1 / (1 + e^-x); e^-x = inf for very negative x gives exactly 0, no NaN
    _, one = k
    return x.neg().exp_().add_(one).reciprocal_()


def sigmoid_backward(g: torch.Tensor, y: torch.Tensor, k) -> torch.Tensor:
    # d/dx = y (1 - y); lerp(g, 0, y) = g (1 - y), exact also for y near 1
    zero, _ = k
    return torch.lerp(g, zero, y).mul_(y)


class SigmoidFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return _compute(sigmoid, _ZERO_ONE, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # the derivative needs y only, which the next layer keeps anyway

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return _compute(sigmoid_backward, _ZERO_ONE, g, y)


class CustomSigmoid(nn.Sigmoid):
    """``nn.Sigmoid`` computed by ``SigmoidFunction``."""

    function = SigmoidFunction

    def forward(self, x):
        return amp.apply(SigmoidFunction, amp.KEEP, x)


registry.register(
    "sigmoid", native=nn.Sigmoid, custom=CustomSigmoid, saves="y (output)",
    cases=cases.sigmoid,
)


# --- tanh -------------------------------------------------------------------------------

_TANH = _Consts(lambda dt: (0.0, 2.0))


def tanh(x: torch.Tensor, k) -> torch.Tensor:
    # tanh x = u / (u + 2) with u = e^(2x) - 1: no cancellation near 0 (u ~ 2x), none for x < 0 (u in (-1, 0))
    # and no overflow, x being clamped to ±20 first, where tanh is 1 within float64 rounding
    _, two = k
    u = x.clamp(-20, 20).mul_(two).expm1_()
    return u.div_(u + two)


def tanh_backward(g: torch.Tensor, y: torch.Tensor, k) -> torch.Tensor:
    # d/dx = 1 - y^2; lerp(g, 0, w) = g (1 - w)
    zero, _ = k
    return torch.lerp(g, zero, y * y)


class TanhFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return _compute(tanh, _TANH, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # the derivative needs y only, which the next layer keeps anyway

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return _compute(tanh_backward, _TANH, g, y)


class CustomTanh(nn.Tanh):
    """``nn.Tanh`` computed by ``TanhFunction``."""

    function = TanhFunction

    def forward(self, x):
        return amp.apply(TanhFunction, amp.KEEP, x)


registry.register(
    "tanh", native=nn.Tanh, custom=CustomTanh, saves="y (output)",
    cases=cases.tanh,
)


# --- hardsigmoid ------------------------------------------------------------------------

_HARDSIGMOID = _Consts(lambda dt: (3.0, 6.0, 9.0, 0.0))


def hardsigmoid(x: torch.Tensor, k) -> torch.Tensor:
    # y = min(max(x + 3, 0), 6) / 6
    three, six, _, _ = k
    return x.clamp(-3, 3).add_(three).div_(six)


def hardsigmoid_backward(g: torch.Tensor, x: torch.Tensor, k) -> torch.Tensor:
    # d/dx = 1/6 on the open interval (-3, 3), else 0 (also at -3 and 3, like native, and at NaN).
    # 9 - x^2 is positive exactly there (the float just below 3 squares to below 9), 0 at ±3 and
    # negative beyond: its sign raised to 0 is the 0/1 mask (sign(NaN) = 0), a constant of x: detached.
    # Native multiplies g by 1/6 rounded to float32 (in float64 too); g/6 here.
    _, _, nine, zero = k
    x = x.detach()
    inside = torch.addcmul(nine, x, x, value=-1).sign_().clamp_min_(0)
    if _owned(g):  # written into the mask, as _times does
        return torch.addcmul(zero, g, inside, value=1 / 6, out=inside)
    return torch.addcmul(zero, g, inside, value=1 / 6)


class HardsigmoidFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return _compute(hardsigmoid, _HARDSIGMOID, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # the input, not y: in float32, x + 3 rounds to 6 just below x = 3, where the grad is still 1/6
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _compute(hardsigmoid_backward, _HARDSIGMOID, g, x)


class CustomHardsigmoid(nn.Hardsigmoid):
    """``nn.Hardsigmoid`` computed by ``HardsigmoidFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = HardsigmoidFunction

    def forward(self, x):
        return amp.apply(HardsigmoidFunction, amp.KEEP, x)


_BELOW_3 = 3 - 2**-22  # the float32 just below 3
_HARD_EDGES = (-math.inf, -1e30, -4.0, -3.0001, -3.0, -_BELOW_3, -2.9999, -0.0, 0.0, 2.9999, _BELOW_3, 3.0, 3.0001, 4.0,
               1e30, math.inf)

registry.register(
    "hardsigmoid", native=nn.Hardsigmoid, custom=CustomHardsigmoid, saves="x (input)",
    cases=cases.hardsigmoid,
)


# --- hardswish --------------------------------------------------------------------------

def _hardswish_consts(dtype: torch.dtype) -> tuple[float, ...]:
    # 3, 6, 1/2, and 3 * 2^-h, 2^h, 2^-h, where 2^(2h) is just above the largest float (h = 64 for float32)
    h = math.frexp(torch.finfo(dtype).max)[1] // 2
    return 3.0, 6.0, 0.5, 3.0 * 2.0**-h, 2.0**h, 2.0**-h


_HARDSWISH = _Consts(_hardswish_consts)
_DOWN = {dt: _hardswish_consts(dt)[-1] for dt in (torch.float32, torch.float64)}  # 2^-h as a number (add's alpha)


def hardswish(x: torch.Tensor, k) -> torch.Tensor:
    # y = x min(max(x + 3, 0), 6) / 6
    three, six, *_ = k
    return x.clamp(-3, 3).add_(three).mul_(x).div_(six)


def hardswish_backward(g: torch.Tensor, x: torch.Tensor, k) -> torch.Tensor:
    # d/dx = 0 up to -3, x/3 + 1/2 on the open interval (-3, 3), 1 from 3 on (native: 0 at -3, 1 at 3).
    # q = x/3 is in (-1, 1) exactly for x in (-3, 3) (the float just below 3, over 3, rounds below 1),
    # so q 2^(2h) overflows to ±inf exactly outside, (1 - ulp) 2^(2h) being the largest float:
    # x / (3 2^-h) 2^h is q 2^(2h) with q's rounding (the rest are powers of two). Scaled back by
    # 2^-h twice (exact), plus 1/2, that is native's x/3 + 1/2 bit for bit, and ±inf outside, made 1 and 0.
    three, _, half, three_down, up, down = k
    if torch.is_grad_enabled():
        # create_graph: the derivative of that would pass through 2^-2h, subnormal in float32.
        # Instead clamp(x, -3, 3)/3 + 1/2, which is 1/2 too low below -3 and too high above 3,
        # where clamp(x, -b, b) - x, b the float just below 3, is positive or negative (0 between).
        b = 3 - 2 * torch.finfo(x.dtype).eps
        xd = x.detach()
        slope = x.clamp(-3, 3).div_(three).add_(half)
        return g * slope.add_(xd.clamp(-b, b).sub_(xd).sign_(), alpha=0.5)
    slope = x.div(three_down).mul_(up).mul_(down)
    # the last 2^-h and the 1/2 in one pass where owned: 1/2 + 2^-h s, the product exact, rounded once
    slope = torch.add(half, slope, alpha=_DOWN[x.dtype], out=slope) if _owned() else slope.mul_(down).add_(half)
    return _times(g, slope.nan_to_num_(math.nan, 1.0, 0.0))


class HardswishFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return _compute(hardswish, _HARDSWISH, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _compute(hardswish_backward, _HARDSWISH, g, x)


class CustomHardswish(nn.Hardswish):
    """``nn.Hardswish`` computed by ``HardswishFunction`` (``inplace`` is ignored: the output is a new tensor)."""

    function = HardswishFunction

    def forward(self, x):
        return amp.apply(HardswishFunction, amp.KEEP, x)


# NaN is left out of the edge cases: native's vectorized and scalar loops disagree on its grad
registry.register(
    "hardswish", native=nn.Hardswish, custom=CustomHardswish, saves="x (input)",
    cases=cases.hardswish,
)
