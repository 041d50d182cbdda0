"""How twins call their Functions: through ``Function.apply``, with autocast's casting done once, outside."""
from __future__ import annotations

import pytest
import torch

from trainer.twins import amp
from trainer.twins.activations import CustomReLU, ReLUFunction


class Probe(torch.autograd.Function):
    """Doubles x, recording the dtype and autocast state its forward and backward see."""

    seen: list[tuple[str, torch.dtype, bool]] = []

    @staticmethod
    def forward(x):
        Probe.seen.append(("forward", x.dtype, torch.is_autocast_enabled("cpu")))
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        Probe.seen.append(("backward", g.dtype, torch.is_autocast_enabled("cpu")))
        return g * 2


@pytest.mark.parametrize("policy,given,runs_in", [
    (amp.KEEP, torch.float32, torch.float32), (amp.KEEP, torch.bfloat16, torch.bfloat16),
    (amp.LOWER, torch.float32, torch.bfloat16), (amp.FP32, torch.bfloat16, torch.float32),
    (amp.FP32_ON_CUDA, torch.float32, torch.float32),
])
def test_under_autocast_inputs_are_cast_once_per_policy_and_the_function_runs_with_autocast_off(policy, given, runs_in):
    Probe.seen.clear()
    x = torch.ones(3, dtype=given, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = amp.apply(Probe, policy, x)
    assert y.dtype == runs_in
    y.float().sum().backward()
    assert Probe.seen == [("forward", runs_in, False), ("backward", runs_in, False)]
    assert x.grad.dtype == given and x.grad.tolist() == [2.0, 2.0, 2.0]


def test_without_autocast_nothing_is_cast():
    Probe.seen.clear()
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    assert amp.apply(Probe, amp.LOWER, x).dtype == torch.float64
    assert Probe.seen == [("forward", torch.float64, False)]


def test_a_twin_calls_its_function_through_function_apply(monkeypatch):
    calls = []
    original = ReLUFunction.apply
    monkeypatch.setattr(ReLUFunction, "apply", classmethod(lambda cls, *a: calls.append(1) or original(*a)))
    x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    y = CustomReLU()(x)
    assert calls == [1] and type(y.grad_fn).__name__ == "ReLUFunctionBackward"
    y.backward(torch.ones(3))
    assert x.grad.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_in_float32_computes_half_types_in_float32_and_rounds_once(dtype):
    x = torch.tensor([1e-3, -2e-3, 0.25], dtype=dtype)
    plus_one_minus_one = amp.in_float32(lambda t, one: t + one - one)
    assert (x + 1 - 1).tolist() != x.tolist()  # rounded after each op, x is lost
    got = plus_one_minus_one(x, torch.ones((), dtype=dtype))
    assert got.dtype == dtype and got.tolist() == x.tolist()


def test_in_float32_leaves_other_dtypes_as_they_are():
    x = torch.tensor([1e-3, 0.25], dtype=torch.float64)
    got = amp.in_float32(lambda t: t * 3)(x)
    assert got.dtype == torch.float64 and got.tolist() == (x * 3).tolist()
