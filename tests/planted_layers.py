"""User layers with planted backward bugs, each beside a correct twin of the same layer (imported by configs)."""
from __future__ import annotations

import torch
from torch import nn

from trainer import datasets, layers, losses, models


def twin(native: type[nn.Module], function: type[torch.autograd.Function]) -> type[nn.Module]:
    def forward(self, x):
        return function.apply(x, *self.parameters())
    return type(f"Custom{native.__name__}", (native,), {"function": function, "forward": forward})


def fn(name: str, forward, backward, saves_input: bool = True) -> type[torch.autograd.Function]:
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(lambda ctx, g: backward(g, *ctx.saved_tensors))})


class Cube(nn.Module):
    def forward(self, x):
        return x ** 3


class SquarePlus(nn.Module):
    def forward(self, x):
        return x * x + x


class Leaky(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x, 0.1 * x)


class MatMul(nn.Module):
    def __init__(self, n: int = 8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n) / n ** 0.5)

    def forward(self, x):
        return x @ self.weight


def flat(x):
    return x.reshape(-1, x.shape[-1])


RIGHT = {
    "cube": (Cube, lambda x: x * x * x, lambda g, x: 3 * x * x * g),
    "square_plus": (SquarePlus, lambda x: x * x + x, lambda g, x: (2 * x + 1) * g),
    "leaky": (Leaky, lambda x: torch.where(x > 0, x, 0.1 * x), lambda g, x: torch.where(x > 0, g, 0.1 * g)),
    "matmul": (MatMul, lambda x, w: x @ w, lambda g, x, w: (g @ w.T, flat(x).T @ flat(g))),
}
WRONG = {  # the same layers, one planted bug each
    "cube": lambda g, x: 6 * x * x * g,                                     # off by a factor
    "square_plus": lambda g, x: 2 * x * g,                                  # a missing term
    "leaky": lambda g, x: torch.where(x > 0, g, -0.1 * g),                  # wrong sign on one branch
    "matmul": lambda g, x, w: (g @ w.T, (flat(x).T @ flat(g)).T),           # a transposed grad
}

for name, (native, forward, backward) in RIGHT.items():
    layers.register(name, native=native, custom=twin(native, fn(f"{native.__name__}Function", forward, backward)))
    bad_native = type(f"{native.__name__}B", (native,), {})  # the same layer, registered a second time
    layers.register(f"{name}_bad", native=bad_native,
                    custom=twin(bad_native, fn(f"{native.__name__}BadFunction", forward, WRONG[name])))


@models.register("planted")
def planted(layer: str = "cube", in_features: int = 10, repeat: int = 1) -> nn.Module:
    """Linear(in, 8) -> (layer -> Linear(8, 8)) * (repeat - 1) -> layer -> Linear(8, 1)."""
    mods: list[nn.Module] = [nn.Linear(in_features, 8)]
    for i in range(repeat):
        mods += [layers.get(layer).native(), nn.Linear(8, 8 if i < repeat - 1 else 1)]
    return nn.Sequential(*mods)



class Poisoned(nn.Module):
    """y = x * weight; its custom twin's backward makes weight's grad NaN on a batch holding the value 7.0."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.weight


class PoisonedFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, w):
        return x * w

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        poison = float("nan") if bool((x == 7.0).any()) else 0.0
        return g * w, (g * x).sum() + poison


layers.register("poisoned", native=Poisoned, custom=twin(Poisoned, PoisonedFunction))


@models.register("poisoned_mlp")
def poisoned_mlp(in_features: int = 10) -> nn.Module:
    return nn.Sequential(Poisoned(), nn.Linear(in_features, 8), nn.ReLU(), nn.Linear(8, 1))


@datasets.register("marked")
def marked(index: int = 300) -> dict:
    """The regression task with one training sample's first feature set to 7.0."""
    data = datasets.regression()
    data["train"].tensors[0][index, 0] = 7.0
    return data


# --- twins for the lockstep, multi-call, kink and raising checks ---------------------------------

class FrozenStatsBatchNorm(nn.BatchNorm1d):
    """A batch norm whose twin normalizes with the batch's statistics but never updates the running ones."""


class NoRunningStats(FrozenStatsBatchNorm):
    def forward(self, x):
        return torch.nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


layers.register("frozen_bn", native=FrozenStatsBatchNorm, custom=NoRunningStats)


@models.register("bn_mlp")
def bn_mlp(in_features: int = 10, hidden: int = 16, norm: str = "batch_norm") -> nn.Module:
    """Linear(bias) -> BatchNorm1d -> ReLU -> Linear: the first bias's true gradient is 0."""
    bn = nn.BatchNorm1d(hidden) if norm == "batch_norm" else layers.get(norm).native(hidden)
    return nn.Sequential(nn.Linear(in_features, hidden), bn, nn.ReLU(), nn.Linear(hidden, 1))


class Twice(nn.Module):
    """Linear -> act -> Linear -> act (the same instance again) -> Linear."""

    def __init__(self, layer: str, in_features: int = 10):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(in_features, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.act = layers.get(layer).native()

    def forward(self, x):
        return self.out(self.act(self.mid(self.act(self.inp(x)))))


models.register("twice")(Twice)


class KinkReLU(nn.ReLU):
    pass


class TutorialReLUFunction(torch.autograd.Function):
    """The tutorial's ReLU: its backward passes the grad where x >= 0, so it is wrong at exactly 0."""

    @staticmethod
    def forward(x):
        return x.clamp(min=0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x >= 0)


layers.register("tutorial_relu", native=KinkReLU,
                custom=type("TutorialReLU", (KinkReLU,), {"forward": lambda self, x: TutorialReLUFunction.apply(x)}))


@models.register("kink")
def kink(in_features: int = 10) -> nn.Module:
    """Linear -> ReLU -> the tutorial ReLU (which sees the first ReLU's exact zeros) -> Linear."""
    return nn.Sequential(nn.Linear(in_features, 8), nn.ReLU(), KinkReLU(), nn.Linear(8, 1))


class Raiser(nn.Module):
    def forward(self, x):
        return 2 * x


class BadViewFunction(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g.view(7, -1)  # a shape error: the grad's size is no multiple of 7


class WrongShapeFunction(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g[:1]  # a grad of the wrong shape: autograd itself refuses it


RaiserW = type("RaiserW", (Raiser,), {})
layers.register("raiser", native=Raiser, custom=twin(Raiser, BadViewFunction))
layers.register("wrong_shape", native=RaiserW, custom=twin(RaiserW, WrongShapeFunction))


class Scale(nn.Module):
    """A user module with no twin."""

    def __init__(self, in_features: int = 10):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(in_features))

    def forward(self, x):
        return (x * self.weight).sum(1, keepdim=True)


models.register("scale")(Scale)


@losses.register("plain_mse")
def plain_mse() -> nn.Module:
    """MSE as a module of its own class, which has no twin."""
    return type("PlainMSE", (nn.Module,), {"forward": lambda self, out, y: ((out - y) ** 2).mean()})()


class DoubleOutFunction(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return (2 * x).double()  # the wrong dtype: the next layer would fail on it

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g.float()


RaiserD = type("RaiserD", (Raiser,), {})
layers.register("bad_dtype", native=RaiserD, custom=twin(RaiserD, DoubleOutFunction))
