"""layers.swap on any model, registered or the user's own, and the registry's own rules."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer import ConfigError, layers


def users_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def test_swap_to_custom_and_back_keeps_everything():
    model = users_model()
    params = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in params.items()}
    calls = []
    model[1].register_forward_hook(lambda *a: calls.append(1))
    model[1].note = "mine"
    layers.swap(model, {"default": "custom"})
    assert type(model[1]).__name__ == "CustomReLU" and isinstance(model[1], nn.ReLU)
    assert layers.impl_of(model[1]) == ("relu", "custom")
    assert all(p is params[n] and torch.equal(p, values[n]) for n, p in model.named_parameters())
    model(torch.randn(2, 6))
    assert calls == [1] and model[1].note == "mine"  # hooks and attributes survive
    layers.swap(model, {"default": "native"})
    assert type(model[1]) is nn.ReLU and layers.impl_of(model[1]) == ("relu", "native")


def test_swap_only_touches_what_the_mapping_names():
    model = users_model()
    layers.swap(model, {"relu": "custom"})
    assert layers.impl_of(model[1])[1] == "custom" and type(model[3]) is nn.Tanh


def test_swapped_user_model_trains_to_the_same_parameters():
    torch.manual_seed(1)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    trained = {}
    for impl in layers.IMPLS:
        model, loss_fn = users_model(), nn.CrossEntropyLoss()
        layers.swap(model, {"default": impl})
        layers.swap(loss_fn, {"default": impl})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(20):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        trained[impl] = model
    for p, q in zip(trained["custom"].parameters(), trained["native"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def test_bad_mappings_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'relu'"):
        layers.swap(users_model(), {"rleu": "custom"})
    with pytest.raises(ConfigError, match="did you mean 'custom'"):
        layers.swap(users_model(), {"default": "custm"})


def test_register_refuses_what_cannot_be_a_twin():
    class Thing(nn.Module):
        def forward(self, x):
            return x

    class NotSub(nn.Module):
        pass

    class WithInit(Thing):
        def __init__(self):
            super().__init__()

    with pytest.raises(ValueError, match="subclass"):
        layers.register("thing_a", native=Thing, custom=NotSub)
    with pytest.raises(ValueError, match="__init__"):
        layers.register("thing_b", native=Thing, custom=WithInit)
    with pytest.raises(ValueError, match="the name is taken by the built-in twin CustomReLU"):
        layers.register("relu", native=Thing, custom=type("T", (Thing,), {}))
