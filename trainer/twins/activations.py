"""Elementwise activations: per op the Function (forward = the formula, backward = its derivative), then its twin.
Branches are ``torch.where`` on native's comparisons, so every edge (x == 0, thresholds, NaN) takes native's side."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.twins import amp
from trainer.twins.amp import in_float32, opmath


class _ElementwiseTwin:
    """``forward`` of the one-tensor activation twins: ``function`` on x (``inplace`` is ignored: y is a new tensor)."""

    def forward(self, x):
        return amp.apply(self.function, amp.KEEP, x)


class ReLUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clamp_min(0)  # y = max(x, 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # y is the next layer's input anyway: saving it costs nothing

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # d/dx = 0 where y <= 0 (x == 0 included, as native), else 1
        return torch.where(y <= 0, 0.0, g)


class CustomReLU(_ElementwiseTwin, nn.ReLU):
    function = ReLUFunction


class LeakyReLUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, slope):
        return torch.where(x > 0, x, x * slope)  # y = x if x > 0 else slope x

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.slope = inputs
        # with slope >= 0, y > 0 exactly where x > 0, and y is kept by the next layer anyway
        ctx.save_for_backward(output if ctx.slope >= 0 else x)

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        # d/dx = 1 where x > 0, else slope (at 0 too)
        return torch.where(t > 0, g, g * ctx.slope), None


class CustomLeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` computed by ``LeakyReLUFunction`` (``inplace`` is ignored: the output is a new tensor)."""
    function = LeakyReLUFunction

    def forward(self, x):
        return amp.apply(LeakyReLUFunction, amp.KEEP, x, self.negative_slope)


class ELUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x, alpha):
        return torch.where(x > 0, x, alpha * torch.expm1(x))  # y = x if x > 0 else alpha (e^x - 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.alpha = inputs
        ctx.from_y = ctx.alpha >= 0  # then y > 0 exactly where x > 0, and there alpha e^x = y + alpha
        ctx.save_for_backward(output if ctx.from_y else x)

    @staticmethod
    def backward(ctx, g):
        t, g = opmath(ctx.saved_tensors[0]), opmath(g)
        # d/dx = alpha e^x where x <= 0 (alpha at 0), else 1; alpha e^x = y + alpha
        slope = t + ctx.alpha if ctx.from_y else ctx.alpha * torch.exp(t)
        return torch.where(t <= 0, g * slope, g), None


class CustomELU(nn.ELU):
    """``nn.ELU`` computed by ``ELUFunction`` (``inplace`` is ignored: the output is a new tensor)."""
    function = ELUFunction

    def forward(self, x):
        return amp.apply(ELUFunction, amp.KEEP, x, self.alpha)


SQRT1_2, INV_SQRT_2PI = 1 / math.sqrt(2), 1 / math.sqrt(2 * math.pi)  # Phi(x) = (1 + erf(x / √2)) / 2, phi = Phi'
BETA, KAPPA = math.sqrt(2 / math.pi), 0.044715  # 'tanh': z = beta (x + kappa x^3)


class GELUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x, approximate):
        if approximate == "tanh":
            return 0.5 * x * (1 + torch.tanh(BETA * (x + KAPPA * x**3)))  # y = x (1 + tanh z) / 2
        if approximate == "none":
            return x * 0.5 * (1 + torch.erf(x * SQRT1_2))  # y = x Phi(x)
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.approximate = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, g):
        x, g = opmath(ctx.saved_tensors[0]), opmath(g)
        if ctx.approximate == "tanh":
            # d/dx = (1 + t) / 2 + x/2 (1 - t^2) z', t = tanh z, z' = beta (1 + 3 kappa x^2)
            t = torch.tanh(BETA * (x + KAPPA * x**3))
            return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * BETA * (1 + 3 * KAPPA * x * x)), None
        # d/dx = Phi(x) + x phi(x)
        return g * (0.5 * (1 + torch.erf(x * SQRT1_2)) + x * INV_SQRT_2PI * torch.exp(-0.5 * x * x)), None


class CustomGELU(nn.GELU):
    function = GELUFunction

    def forward(self, x):
        return amp.apply(GELUFunction, amp.KEEP, x, self.approximate)


class SiLUFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x):
        return x * torch.sigmoid(x)  # y = x sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        x, g = opmath(ctx.saved_tensors[0]), opmath(g)
        s = torch.sigmoid(x)
        return g * s * (1 + x * (1 - s))  # d/dx = s (1 + x (1 - s)), s = sigmoid(x)


class CustomSiLU(_ElementwiseTwin, nn.SiLU):
    function = SiLUFunction


class MishFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x):
        return x * torch.tanh(F.softplus(x))  # y = x tanh(softplus x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        x, g = opmath(ctx.saved_tensors[0]), opmath(g)
        # d/dx = T + x sigmoid(x) (1 - T^2), T = tanh(softplus x) (softplus, not log(1 + e^x), stays finite)
        t = torch.tanh(F.softplus(x))
        return g * (t + x * torch.sigmoid(x) * (1 - t * t))


class CustomMish(_ElementwiseTwin, nn.Mish):
    function = MishFunction


class SoftplusFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x, beta, threshold):
        # y = x if beta x > threshold else log(1 + e^(beta x)) / beta (the branch not taken may overflow)
        return torch.where(x * beta > threshold, x, torch.log1p(torch.exp(x * beta)) / beta)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.beta, ctx.threshold = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, g):
        x, g = opmath(ctx.saved_tensors[0]), opmath(g)
        # d/dx = 1 if beta x > threshold (strictly, as native) else sigmoid(beta x)
        return torch.where(x * ctx.beta > ctx.threshold, g, g * torch.sigmoid(x * ctx.beta)), None, None


class CustomSoftplus(nn.Softplus):
    function = SoftplusFunction

    def forward(self, x):
        return amp.apply(SoftplusFunction, amp.FP32_ON_CUDA, x, self.beta, self.threshold)


class SigmoidFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x):
        return 1 / (1 + torch.exp(-x))  # y = 1 / (1 + e^-x); e^-x = inf gives exactly 0

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # the derivative needs y only, which the next layer keeps anyway

    @staticmethod
    def backward(ctx, g):
        y, g = opmath(ctx.saved_tensors[0]), opmath(g)
        return g * (1 - y) * y  # d/dx = y (1 - y)


class CustomSigmoid(_ElementwiseTwin, nn.Sigmoid):
    function = SigmoidFunction


class TanhFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x):
        return torch.tanh(x)  # y = (e^2x - 1) / (e^2x + 1), as torch.tanh computes it (as written it overflows)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)  # the derivative needs y only, which the next layer keeps anyway

    @staticmethod
    def backward(ctx, g):
        y, g = opmath(ctx.saved_tensors[0]), opmath(g)
        return g * (1 - y * y)  # d/dx = 1 - y^2


class CustomTanh(_ElementwiseTwin, nn.Tanh):
    function = TanhFunction


class HardsigmoidFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x):
        return (x + 3).clamp(0, 6) / 6  # y = min(max(x + 3, 0), 6) / 6

    @staticmethod
    def setup_context(ctx, inputs, output):
        # the input, not y: in float32, x + 3 rounds to 6 just below x = 3, where the slope is still 1/6
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # d/dx = 1/6 on the open interval (-3, 3), else 0 (at -3 and 3 too, as native)
        return torch.where((x > -3) & (x < 3), g / 6, 0.0)


class CustomHardsigmoid(_ElementwiseTwin, nn.Hardsigmoid):
    function = HardsigmoidFunction


class HardswishFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    @in_float32
    def forward(x):
        return x * (x + 3).clamp(0, 6) / 6  # y = x min(max(x + 3, 0), 6) / 6

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        x, g = opmath(ctx.saved_tensors[0]), opmath(g)
        # d/dx = 0 up to -3 (at -3 too), x/3 + 1/2 on the open interval (-3, 3), 1 from 3 on (at 3 too), as native
        return torch.where(x <= -3, 0.0, torch.where(x < 3, g * (x / 3 + 0.5), g))


class CustomHardswish(_ElementwiseTwin, nn.Hardswish):
    function = HardswishFunction
