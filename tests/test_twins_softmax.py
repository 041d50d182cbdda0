"""Softmax twins: the edges and uses that the registry-wide walk in test_layers.py cannot express."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer import layers

KINDS = {"softmax": nn.Softmax, "log_softmax": nn.LogSoftmax}


def run(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    y = module(x)
    return y, torch.autograd.grad(y, x, g)[0]


def both(name: str, dim: int | None, x: torch.Tensor, g: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
    return {impl: run(layers.swap(KINDS[name](dim=dim), {name: impl}), x, g) for impl in layers.IMPLS}


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_dim_none_picks_and_warns_like_native(name, ndim):
    x = torch.randn(*[3] * ndim)
    seen = {}
    for impl in layers.IMPLS:
        with pytest.warns(UserWarning, match="Implicit dimension choice"):
            seen[impl] = run(layers.swap(KINDS[name](dim=None), {name: impl}), x, torch.ones_like(x))
    for c, n in zip(seen["custom"], seen["native"]):
        torch.testing.assert_close(c, n)


@pytest.mark.parametrize("name", KINDS)
def test_large_rows_are_stable(name):
    x = torch.tensor([[1e4, 1e4 - 1, -1e4, 0.0], [-3e4, -3e4, -3e4 + 2, -3e4 + 1]])
    seen = both(name, -1, x, torch.randn(2, 4))
    assert all(t.isfinite().all() for t in seen["custom"])
    for c, n in zip(seen["custom"], seen["native"]):
        torch.testing.assert_close(c, n)


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32_and_keep_their_dtype(name, dtype):
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(6, 50, generator=gen).to(dtype), torch.randn(6, 50, generator=gen).to(dtype)
    seen = both(name, 1, x, g)
    for c, n in zip(seen["custom"], seen["native"]):
        assert c.dtype == n.dtype == dtype
        torch.testing.assert_close(c.float(), n.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("name", KINDS)
def test_saves_only_the_output(name):
    x = torch.randn(4, 5, requires_grad=True)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: seen.append(s) or s, lambda s: s):
        y = layers.swap(KINDS[name](dim=1), {name: "custom"})(x * 2.0)
    saved = [s for s in seen if s.shape == y.shape and s.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()]
    assert [s.untyped_storage().data_ptr() for s in saved] == [y.untyped_storage().data_ptr()]


@pytest.mark.parametrize("name", KINDS)
def test_per_sample_grads_with_vmap_match_a_loop_of_native(name):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    r = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    native, custom = (layers.swap(KINDS[name](dim=-2), {name: impl}) for impl in layers.IMPLS)
    grad_c = torch.func.grad(lambda xi: (custom(xi) * r).sum())
    grad_n = torch.func.grad(lambda xi: (native(xi) * r).sum())
    torch.testing.assert_close(torch.func.vmap(grad_c)(x), torch.stack([grad_n(xi) for xi in x]))


def test_attention_block_with_swapped_softmax_gives_native_grads():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, generator=gen)
    grads = {}
    for impl in layers.IMPLS:
        torch.manual_seed(0)
        qkv, out, softmax = nn.Linear(8, 24), nn.Linear(8, 8), layers.swap(nn.Softmax(dim=-1), {"softmax": impl})
        q, k, v = qkv(x).chunk(3, dim=-1)
        y = out(softmax(q @ k.transpose(-2, -1) / 8 ** 0.5) @ v)
        y.pow(2).mean().backward()
        grads[impl] = [p.grad for p in (*qkv.parameters(), *out.parameters())]
    for gc, gn in zip(grads["custom"], grads["native"]):
        torch.testing.assert_close(gc, gn)
