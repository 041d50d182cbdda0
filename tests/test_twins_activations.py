"""Activation twins: what the per-layer harness in test_layers.py cannot express."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from trainer import layers

# (registry name, module factory, what its Function saves)
TWINS = [
    ("relu", nn.ReLU, "y"),
    ("leaky_relu", nn.LeakyReLU, "y"),
    ("leaky_relu", lambda: nn.LeakyReLU(-0.3), "x"),
    ("elu", nn.ELU, "y"),
    ("elu", lambda: nn.ELU(alpha=-0.5), "x"),
    ("gelu", nn.GELU, "x"),
    ("gelu", lambda: nn.GELU(approximate="tanh"), "x"),
    ("silu", nn.SiLU, "x"),
    ("mish", nn.Mish, "x"),
    ("softplus", nn.Softplus, "x"),
    ("softplus", lambda: nn.Softplus(beta=2.0, threshold=5.0), "x"),
    ("sigmoid", nn.Sigmoid, "y"),
    ("tanh", nn.Tanh, "y"),
    ("hardsigmoid", nn.Hardsigmoid, "x"),
    ("hardswish", nn.Hardswish, "x"),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(TWINS)]


def custom(name, make):
    return layers.swap(make(), {name: "custom"})


def forward_backward(module, x, g):
    x = x.detach().requires_grad_()
    y = module(x)
    (dx,) = torch.autograd.grad(y, x, g)
    return y.detach(), dx


@pytest.mark.parametrize("name,make,saves", TWINS, ids=IDS)
def test_saves_only_the_output_or_only_the_input(name, make, saves):
    x = torch.randn(5, 7, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = custom(name, make)(x)
    assert len(packed) == 1
    expected = y if saves == "y" else x
    assert packed[0].untyped_storage().data_ptr() == expected.untyped_storage().data_ptr()


@pytest.mark.parametrize("beta,threshold", [(1.0, 10.0), (2.0, 5.0), (0.5, 3.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_threshold_is_strict_like_native(beta, threshold, dtype):
    at = torch.tensor(threshold / beta, dtype=dtype)
    assert (at * beta).item() == threshold  # these beta/threshold pairs hit beta x == threshold exactly
    above = torch.nextafter(at, torch.tensor(math.inf, dtype=dtype))
    x = torch.stack([torch.nextafter(at, torch.tensor(0.0, dtype=dtype)), at, above])
    g = torch.ones_like(x)
    y_n, dx_n = forward_backward(nn.Softplus(beta, threshold), x, g)
    y_c, dx_c = forward_backward(custom("softplus", lambda: nn.Softplus(beta, threshold)), x, g)
    torch.testing.assert_close(y_c, y_n)
    torch.testing.assert_close(dx_c, dx_n)
    assert y_c[1] > x[1] and dx_c[1] < 1  # at the threshold: still log(1 + e^(beta x)) / beta
    assert y_c[2] == x[2] and dx_c[2] == 1  # just above it: exactly x, and slope exactly 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,make", [
    ("relu", nn.ReLU), ("leaky_relu", nn.LeakyReLU), ("leaky_relu", lambda: nn.LeakyReLU(0.0)),
    ("leaky_relu", lambda: nn.LeakyReLU(-0.3)), ("leaky_relu", lambda: nn.LeakyReLU(1.5)), ("elu", nn.ELU),
    ("elu", lambda: nn.ELU(alpha=2.0)), ("hardsigmoid", nn.Hardsigmoid), ("hardswish", nn.Hardswish),
])
def test_piecewise_twins_take_natives_side_at_every_kink(name, make, dtype):
    """At a kink (0, +-3, and the floats next to them) a wrong side of a comparison is off by O(1).

    Finite values only: there native's vectorized and scalar loops agree (see test_layers' edge cases).
    """
    below_3 = torch.nextafter(torch.tensor(3.0, dtype=dtype), torch.tensor(0.0, dtype=dtype)).item()
    kinks = [-1e30, -4.0, -3.0, -below_3, -1.5, -1.0, -0.0, 0.0, 1e-30, 0.5, below_3, 3.0, 4.0, 1e30]
    x = torch.cat([torch.tensor(kinks, dtype=dtype), 4 * torch.randn(300, dtype=dtype,
                                                                       generator=torch.Generator().manual_seed(0))])
    g = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y_n, dx_n = forward_backward(make(), x, g)
    y_c, dx_c = forward_backward(custom(name, make), x, g)
    torch.testing.assert_close(y_c, y_n)
    torch.testing.assert_close(dx_c, dx_n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,make,saves", TWINS, ids=IDS)
def test_low_precision_errors_no_worse_than_native(name, make, saves, dtype):
    """Half inputs (no autocast): output and grad dtypes as native, error against float64 at most 2x native's."""
    x = 3 * torch.randn(2000, generator=torch.Generator().manual_seed(0))
    g = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    x, g = x.to(dtype), g.to(dtype)
    y_ref, dx_ref = forward_backward(make().double(), x.double(), g.double())
    results = {impl: forward_backward(layers.swap(make(), {name: impl}), x, g) for impl in layers.IMPLS}
    (y_n, dx_n), (y_c, dx_c) = results["native"], results["custom"]
    assert y_c.dtype == y_n.dtype == dtype and dx_c.dtype == dx_n.dtype == dtype
    for got, native, ref in ((y_c, y_n, y_ref), (dx_c, dx_n, dx_ref)):
        error, native_error = (got.double() - ref).abs().max(), (native.double() - ref).abs().max()
        assert error <= 2 * native_error + 1e-6


@pytest.mark.parametrize("name,make,saves", TWINS, ids=IDS)
def test_vmap_needs_no_slow_fallback(name, make, saves):
    """vmap over inputs and over grad_outputs (jacrev) uses batching rules for every op the twin runs."""
    module = custom(name, make)
    x = torch.randn(3, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        per_sample = torch.func.vmap(torch.func.grad(lambda t: module(t).sum()))(x)
        jacobian = torch.func.jacrev(module)(x[0])
    assert per_sample.shape == x.shape and jacobian.shape == (4, 4)


@pytest.mark.parametrize("name,make", [
    ("leaky_relu", nn.LeakyReLU), ("elu", nn.ELU), ("silu", nn.SiLU), ("mish", nn.Mish),
    ("hardsigmoid", nn.Hardsigmoid), ("hardswish", nn.Hardswish),
])
def test_inplace_flag_is_ignored(name, make):
    x = torch.randn(4, 5)
    before = x.clone()
    y = custom(name, lambda: make(inplace=True))(x)
    assert torch.equal(x, before)
    torch.testing.assert_close(y, make()(x))


def test_gelu_rejects_an_unknown_approximation():
    module = custom("gelu", nn.GELU)
    module.approximate = "erf"
    with pytest.raises(ValueError, match="approximate"):
        module(torch.randn(3))
