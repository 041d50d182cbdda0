"""The seed article's CustomReLU, registered as nn.ReLU's twin and compared with nn.ReLU by trainer's comparison.

The tutorial's backward zeroes the grad where ``input < 0``, so at exactly ``x == 0`` it
passes the grad through (slope 1); native ReLU's backward is ``threshold_backward(g, y, 0)``,
which gives 0 there. Random floats almost never hit 0, so the difference hides, until the
data has exact zeros (padding, a ReLU after a ReLU, sparse features). This script feeds such
data and lets the tool find and name the disagreement; the registry's ReLU twin agrees.
docs/twins.md walks through the same bug with the `trainer` command and builds a correct twin.

    python experiments/custom_relu.py
"""
from __future__ import annotations

import torch
from torch import nn

from trainer import layers
from trainer.check.compare import Comparison
from trainer.check.report import format_report


class TutorialReLUFunction(torch.autograd.Function):
    """The seed article's Function, as written there (old-style forward with ctx)."""

    @staticmethod
    def forward(ctx, input):
        ctx.save_for_backward(input)
        return input.clamp(min=0)

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        grad_input = grad_output.clone()
        grad_input[input < 0] = 0  # 1 at input == 0, where native gives 0
        return grad_input


class TutorialReLU(nn.ReLU):
    function = TutorialReLUFunction

    def forward(self, x):
        return TutorialReLUFunction.apply(x)


def model_and_data(activation: type[nn.Module]):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), activation(), nn.Linear(8, 1))
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    x[::4] = 0.0  # every fourth row is padding: its pre-activations are exactly 0
    y = torch.randn(32, 1, generator=torch.Generator().manual_seed(2))
    return model, [(x, y)]


def main() -> tuple[bool, bool]:
    model, batches = model_and_data(nn.ReLU)
    builtin = Comparison(model, nn.MSELoss(), batches, {"relu": "custom"}).report()
    # from here on, the tutorial's twin stands in for the registry's own (as a user's module would do it)
    layers.register("relu", native=nn.ReLU, custom=TutorialReLU, replace=True, saves="x (input)")
    print("1. The tutorial's CustomReLU against nn.ReLU, on data with exact zeros\n")
    model, batches = model_and_data(nn.ReLU)
    tutorial = Comparison(model, nn.MSELoss(), batches, {"relu": "custom"}).report()
    print(format_report(tutorial))
    pre = model[0](batches[0][0])
    dx = {impl: torch.autograd.grad(layers.swap(nn.Sequential(nn.ReLU()), {"relu": impl})(p).sum(), p)[0]
          for impl in layers.IMPLS for p in [pre.detach().requires_grad_()]}
    where = (dx["custom"] != dx["native"]).nonzero()[:, 0].unique().tolist()
    print(f"\n   {int((pre == 0).sum())} pre-activations are exactly 0 (rows {where} of the batch, the padding)."
          "\n   There the tutorial's mask `input < 0` passes the grad through (slope 1), while native"
          "\n   ReLU's threshold_backward(g, y, 0) gives 0: max_rel is inf because native is exactly 0."
          "\n   Here the padding rows are all-zero inputs, so 0.weight's grad (dx^T x) hides the error;"
          "\n   a bias, or any op before the ReLU whose grad does not vanish at 0, would carry it on.\n")
    print("2. The registry's ReLU twin against nn.ReLU, on the same data\n")
    print(format_report(builtin))
    return tutorial.ok, builtin.ok


if __name__ == "__main__":
    tutorial_ok, builtin_ok = main()
    raise SystemExit(0 if (not tutorial_ok and builtin_ok) else 1)
