"""Checks of the linear, conv2d and embedding twins that the registry-wide walk in test_layers cannot express."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer import layers
from trainer.twins.dense import Conv2dFunction, LinearFunction


def twins(native: nn.Module, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module]:
    """The module and a custom copy with the same weights, in ``dtype``."""
    native = native.to(dtype)
    return native, layers.swap(copy.deepcopy(native), {"default": "custom"})


def forward_backward(module: nn.Module, x: torch.Tensor, g: torch.Tensor | None = None, x_grad: bool = True):
    """(output, dx or None, {param name: grad or None}) for ``module(x)`` and grad_output ``g``."""
    x = x.detach().clone().requires_grad_(x_grad and x.is_floating_point())
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1)) if g is None else g)
    return y, x.grad, {n: p.grad for n, p in module.named_parameters()}


def assert_twins_agree(native: nn.Module, custom: nn.Module, x: torch.Tensor, x_grad: bool = True, **tol):
    y_n, dx_n, grads_n = forward_backward(native, x, x_grad=x_grad)
    y_c, dx_c, grads_c = forward_backward(custom, x, x_grad=x_grad)
    torch.testing.assert_close(y_c, y_n, **tol)
    torch.testing.assert_close(dx_c, dx_n, **tol)
    assert grads_c.keys() == grads_n.keys()
    for name in grads_n:
        torch.testing.assert_close(grads_c[name], grads_n[name], **tol, msg=lambda m: f"{name}: {m}")
    return y_n, y_c


# --- linear -----------------------------------------------------------------------------

def test_linear_with_only_the_weight_needing_grad_saves_x_and_returns_no_dx():
    _, linear = twins(nn.Linear(4, 3))
    x = torch.randn(5, 4, dtype=torch.float64)
    y = linear(x)
    x_saved, W_saved = y.grad_fn.saved_tensors
    assert x_saved is x and W_saved is None
    dx, dW, db = LinearFunction.backward(y.grad_fn, torch.ones_like(y))  # a custom node is its own ctx
    assert dx is None and dW.shape == (3, 4) and db.shape == (3,)


def test_linear_with_a_frozen_weight_saves_only_the_weight():
    native, linear = twins(nn.Linear(4, 3))
    for m in (native, linear):
        m.weight.requires_grad_(False)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert linear(x).grad_fn.saved_tensors == (None, linear.weight)
    assert_twins_agree(native, linear, x)
    assert linear.weight.grad is None


@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 4), (3, 2, 5, 4)], ids=["empty-batch", "empty-middle", "4d"])
def test_linear_odd_leading_shapes_match_native(shape):
    native, linear = twins(nn.Linear(4, 3))
    assert_twins_agree(native, linear, torch.randn(shape, dtype=torch.float64))


def test_linear_permuted_input_matches_native():
    native, linear = twins(nn.Linear(4, 3))
    x = torch.randn(4, 5, 2, dtype=torch.float64).permute(2, 1, 0)  # (2, 5, 4), not contiguous
    assert_twins_agree(native, linear, x)


# --- conv2d -----------------------------------------------------------------------------

GEOMETRIES = [  # (kernel, stride, padding, dilation, groups, input H x W): strides leaving rows unread, too
    (3, 2, 1, 1, 1, (6, 7)),
    (3, 3, 0, 1, 1, (8, 10)),
    (2, 2, 1, 2, 1, (7, 6)),
    ((3, 1), (1, 2), (0, 1), (2, 1), 2, (7, 5)),
    (3, 1, "same", 2, 2, (5, 6)),
    (4, 1, "same", 1, 1, (5, 5)),
]


@pytest.mark.parametrize("needs", ["x", "weight", "both"])
@pytest.mark.parametrize("k,s,p,d,groups,hw", GEOMETRIES)
def test_conv2d_each_backward_path_matches_native(k, s, p, d, groups, hw, needs):
    """Whichever of x and W needs a grad: a grad not asked for is neither computed nor saved for."""
    torch.manual_seed(0)
    native, conv = twins(nn.Conv2d(2, 4, k, stride=s, padding=p, dilation=d, groups=groups))
    for m in (native, conv):
        m.weight.requires_grad_(needs != "x")
    x = torch.randn(2, 2, *hw, dtype=torch.float64)
    assert_twins_agree(native, conv, x, x_grad=needs != "weight")
    x_saved, W_saved = conv(x.requires_grad_(needs != "weight")).grad_fn.saved_tensors
    assert (x_saved is None) == (needs == "x") and (W_saved is None) == (needs == "weight")


@pytest.mark.parametrize("needs", ["x", "weight"])
def test_conv2d_double_backward_on_the_single_grad_paths(needs):
    torch.manual_seed(0)
    conv = layers.swap(nn.Conv2d(2, 2, 3, stride=2, padding=1).double(), {"default": "custom"})
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=needs == "x")
    W = conv.weight.detach().requires_grad_(needs == "weight")
    args = (x,) if needs == "x" else (W,)

    def fn(arg):
        inputs = (arg, W) if needs == "x" else (x, arg)
        return Conv2dFunction.apply(*inputs, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


def test_conv2d_channels_last_matches_native():
    torch.manual_seed(0)
    native, conv = twins(nn.Conv2d(4, 6, 3, padding=1), torch.float32)
    native, conv = native.to(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 7, 6).to(memory_format=torch.channels_last)
    y_n, y_c = assert_twins_agree(native, conv, x, rtol=1e-5, atol=1e-5)
    assert y_c.is_contiguous(memory_format=torch.channels_last) == y_n.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv2d_same_padding_with_a_padding_mode_and_an_even_kernel_matches_native(mode):
    torch.manual_seed(0)
    native, conv = twins(nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode=mode))
    y_n, y_c = assert_twins_agree(native, conv, torch.randn(1, 2, 5, 4, dtype=torch.float64))
    assert y_c.shape == (1, 3, 5, 4)


# --- embedding --------------------------------------------------------------------------

def test_embedding_padding_row_gets_zero_grad_and_repeats_accumulate():
    native, emb = twins(nn.Embedding(5, 2, padding_idx=3))
    idx = torch.tensor([[3, 1, 3], [1, 1, 0]])
    g = torch.ones(2, 3, 2, dtype=torch.float64)
    for m in (native, emb):
        forward_backward(m, idx, g)
    expected = torch.tensor([[1, 1], [3, 3], [0, 0], [0, 0], [0, 0]], dtype=torch.float64)
    torch.testing.assert_close(emb.weight.grad, expected)
    torch.testing.assert_close(emb.weight.grad, native.weight.grad)


@pytest.mark.parametrize("idx", [torch.tensor([], dtype=torch.long), torch.tensor(2), torch.tensor([[4, 0], [4, 4]],
                                 dtype=torch.int32)], ids=["empty", "scalar", "int32"])
def test_embedding_odd_indices_match_native(idx):
    native, emb = twins(nn.Embedding(5, 3, padding_idx=0))
    assert_twins_agree(native, emb, idx)


def test_embedding_max_norm_renormalizes_the_weight_like_native():
    torch.manual_seed(0)
    native, emb = twins(nn.Embedding(6, 4, max_norm=0.5))
    idx = torch.tensor([[0, 2, 2], [5, 1, 0]])
    assert_twins_agree(native, emb, idx)
    torch.testing.assert_close(emb.weight, native.weight)
    assert emb.weight[idx.unique()].norm(dim=1).max() <= 0.5 + 1e-6


def test_embedding_refuses_sparse_gradients():
    _, emb = twins(nn.Embedding(5, 3, sparse=True))
    with pytest.raises(NotImplementedError, match="sparse=True"):
        emb(torch.tensor([1, 2]))


def test_embedding_jacobian_with_padding_hits_matches_native():
    """vmap of the backward, on the padding row that the gradcheck cases cannot hit."""
    idx = torch.tensor([[1, 2, 1], [4, 1, 2]])
    jacobians = []
    for impl in layers.IMPLS:
        module = layers.swap(nn.Embedding(5, 3, padding_idx=1).double(), {"embedding": impl})
        W = module.weight.detach()
        jacobians.append(torch.func.jacrev(lambda w: torch.func.functional_call(module, {"weight": w}, (idx,)))(W))
    torch.testing.assert_close(jacobians[1], jacobians[0])
    assert jacobians[1][..., 1, :].abs().sum() == 0


@pytest.mark.slow
def test_embedding_compiled_with_padding_hits_matches_eager():
    import torch._dynamo
    torch._dynamo.reset()
    native, emb = twins(nn.Embedding(5, 3, padding_idx=1, scale_grad_by_freq=True), torch.float32)
    idx = torch.tensor([[1, 2, 1], [4, 1, 2]])
    compiled = torch.compile(emb, fullgraph=True)
    compiled(idx).sum().backward()
    native(idx).sum().backward()
    torch.testing.assert_close(emb.weight.grad, native.weight.grad)


def test_twins_under_non_reentrant_checkpoint_match_native():
    """What each Function saves goes through saved_tensors_hooks, so checkpointing frees and recomputes it."""
    torch.manual_seed(0)
    native, custom = twins(nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.Flatten(), nn.Linear(12, 2)))
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    for m in (native, custom):
        checkpoint(m, x, use_reentrant=False).square().sum().backward()
    for (name, p_n), p_c in zip(native.named_parameters(), custom.parameters()):
        torch.testing.assert_close(p_c.grad, p_n.grad, msg=lambda m: f"{name}: {m}")
