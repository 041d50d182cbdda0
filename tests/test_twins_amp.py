"""How twins call their Functions: the eager fast path, and the public Function.apply everywhere else."""
from __future__ import annotations

import torch

from trainer.twins import amp
from trainer.twins.activations import CustomReLU, ReLUFunction


def counting_apply(monkeypatch, function):
    calls = []
    original = function.apply
    monkeypatch.setattr(function, "apply", classmethod(lambda cls, *a: calls.append(1) or original(*a)))
    return calls


def test_eager_call_skips_the_python_wrapper_but_keeps_the_custom_node(monkeypatch):
    calls = counting_apply(monkeypatch, ReLUFunction)
    x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    y = CustomReLU()(x)
    assert calls == [] and type(y.grad_fn).__name__ == "ReLUFunctionBackward"
    y.backward(torch.ones(3))
    assert x.grad.tolist() == [0.0, 0.0, 1.0]


def test_transforms_and_missing_arguments_use_function_apply(monkeypatch):
    calls = counting_apply(monkeypatch, ReLUFunction)
    x = torch.tensor([-1.0, 0.5, 2.0])
    assert torch.func.grad(lambda t: CustomReLU()(t).sum())(x).tolist() == [0.0, 1.0, 1.0]
    after_grad = len(calls)
    assert torch.func.vmap(CustomReLU())(x.reshape(3, 1)).flatten().tolist() == [0.0, 0.5, 2.0]
    assert after_grad >= 1 and len(calls) > after_grad


class Scale(torch.autograd.Function):
    @staticmethod
    def forward(x, factor=2.0):
        return x * factor

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.factor = inputs[1]  # present only because Function.apply binds the default

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def test_a_left_out_default_goes_through_function_apply(monkeypatch):
    calls = counting_apply(monkeypatch, Scale)
    x = torch.ones(2, requires_grad=True)
    amp.call(Scale, (x,)).sum().backward()
    assert calls == [1] and x.grad.tolist() == [2.0, 2.0]
    amp.call(Scale, (x, 3.0))
    assert calls == [1]
