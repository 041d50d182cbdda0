"""How twins call their Functions: the eager fast path, and the public Function.apply everywhere else."""
from __future__ import annotations

import torch

from trainer.functions import amp
from trainer.functions.activations import CustomReLU, ReLUFunction
from trainer.functions.dense import LinearFunction


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
    lin = counting_apply(monkeypatch, LinearFunction)
    amp.call(LinearFunction, (torch.randn(2, 3), torch.randn(4, 3)))  # bias left out: arity differs
    assert lin == [1]
