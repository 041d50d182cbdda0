"""Loss twins: the edges and uses that the registry-wide walk in test_layers.py cannot express."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainer import layers

F32 = dict(rtol=1e-5, atol=1e-6)


def twins(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(native, custom) copies of a loss module."""
    native = copy.deepcopy(module)
    return layers.swap(native, {"default": "native"}), layers.swap(copy.deepcopy(module), {"default": "custom"})


def loss_and_grad(module: nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    out = module(x, t)
    (gx,) = torch.autograd.grad(out, x, torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return out, gx


def assert_twins_agree(module: nn.Module, x: torch.Tensor, t: torch.Tensor, **tol) -> None:
    native, custom = twins(module)
    (out_n, gx_n), (out_c, gx_c) = loss_and_grad(native, x, t), loss_and_grad(custom, x, t)
    torch.testing.assert_close(out_c, out_n, equal_nan=True, **(tol or F32))
    torch.testing.assert_close(gx_c, gx_n, equal_nan=True, **(tol or F32))


WEIGHT = torch.tensor([0.5, 2.0, 1.0, 0.25, 3.0])


@pytest.mark.parametrize("weight", [None, WEIGHT], ids=["no-weight", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_all_ignored_is_nan_with_zero_grads_like_native(weight, smoothing):
    module = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)
    x, t = torch.randn(4, 5), torch.full((4,), -100)
    _, custom = twins(module)
    out, gx = loss_and_grad(custom, x, t)
    assert out.isnan() and gx.eq(0).all()
    assert_twins_agree(module, x, t)


def test_cross_entropy_valid_rows_of_zero_weight_give_nan_like_native():
    assert_twins_agree(nn.CrossEntropyLoss(weight=torch.tensor([0.0, 0.0, 1.0])),
                       torch.randn(3, 3), torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_spatial_input_with_every_option(reduction):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, 7, generator=gen)
    t = torch.randint(5, (3, 6, 7), generator=gen)
    t[:, ::2, 1::3] = 3  # ignored
    module = nn.CrossEntropyLoss(weight=WEIGHT, ignore_index=3, label_smoothing=0.15, reduction=reduction)
    assert_twins_agree(module, x, t)
    probs = torch.randn(3, 5, 6, 7, generator=gen).softmax(1)
    assert_twins_agree(nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.1, reduction=reduction), x, probs)


def test_cross_entropy_realistic_size_and_offset_logits():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1000, generator=gen) * 3 + 1000  # large common offset: precision of log p matters
    t = torch.randint(1000, (512,), generator=gen)
    assert_twins_agree(nn.CrossEntropyLoss(label_smoothing=0.1), x, t)
    assert_twins_agree(nn.CrossEntropyLoss(), x, t)


def test_cross_entropy_saves_one_logits_sized_tensor_like_native():
    """It keeps the logits (recomputing log p in backward), native keeps log p: as many bytes."""
    x = torch.randn(8, 10, requires_grad=True)
    t = torch.randint(10, (8,))
    saved = {}
    for impl in layers.IMPLS:
        module = layers.swap(nn.CrossEntropyLoss(label_smoothing=0.1), {"cross_entropy": impl})
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: seen.append(s) or s, lambda s: s):
            module(x * 2.0, t)
        big = {s.untyped_storage().data_ptr(): s for s in seen if s.is_floating_point() and s.numel() == x.numel()}
        saved[impl] = [(s.dtype, s.shape) for s in big.values()]
    assert saved["custom"] == saved["native"] == [(torch.float32, x.shape)]


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_probability_target_grads_match_native(smoothing):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 3, dtype=torch.float64, generator=gen)
    t = torch.randn(4, 5, 3, dtype=torch.float64, generator=gen).softmax(1)
    grads = {}
    module = nn.CrossEntropyLoss(weight=WEIGHT.double(), label_smoothing=smoothing)
    for impl, module in zip(layers.IMPLS, twins(module)):
        xi, ti = x.clone().requires_grad_(), t.clone().requires_grad_()
        grads[impl] = torch.autograd.grad(module(xi, ti), (xi, ti))
    torch.testing.assert_close(grads["custom"], grads["native"])


@pytest.mark.parametrize("x,t,error", [
    (torch.randn(3, 4), torch.tensor([0, 1]), ValueError),
    (torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long), RuntimeError),
    (torch.randn(3, 4), torch.rand(2, 4), ValueError),
    (torch.randn(3, 4, 2), torch.rand(3, 4, 3), RuntimeError),
], ids=["batch", "spatial", "probs-batch", "probs-shape"])
def test_cross_entropy_mismatched_targets_raise_like_native(x, t, error):
    for module in twins(nn.CrossEntropyLoss()):
        with pytest.raises(error):
            module(x, t)


def test_cross_entropy_probability_targets_refuse_ignore_index_like_native():
    for module in twins(nn.CrossEntropyLoss(ignore_index=1)):
        with pytest.raises(RuntimeError, match="ignore_index is not supported"):
            module(torch.randn(3, 4), torch.rand(3, 4))


def test_bce_with_logits_size_mismatch_is_a_value_error_like_native():
    for module in twins(nn.BCEWithLogitsLoss()):
        with pytest.raises(ValueError, match="must be the same as input size"):
            module(torch.randn(3, 4), torch.rand(3, 1))


@pytest.mark.parametrize("pos_weight", [None, torch.tensor([3.0, 0.5])], ids=["plain", "pos_weight"])
def test_bce_with_logits_extreme_logits_are_finite(pos_weight):
    x = torch.tensor([[1000.0, -1000.0], [88.0, -88.0], [-100.0, 100.0]])
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    module = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")
    out, gx = loss_and_grad(twins(module)[1], x, t)
    assert out.isfinite().all() and gx.isfinite().all()
    assert_twins_agree(module, x, t)


def test_huber_second_derivative_at_delta_matches_native():
    x = torch.tensor([1.5, -0.5, 0.75, 3.0], dtype=torch.float64)
    t = torch.tensor([0.5, 0.5, 0.5, 0.0], dtype=torch.float64)  # |x − t| == δ == 1 for the first two
    hessian_diag = {}
    for impl, module in zip(layers.IMPLS, twins(nn.HuberLoss(reduction="sum"))):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(module(xi, t), xi, create_graph=True)
        hessian_diag[impl] = torch.autograd.grad(g.sum(), xi)[0]
    torch.testing.assert_close(hessian_diag["custom"], hessian_diag["native"])


def test_l1_saves_one_byte_per_element():
    x, t = torch.randn(6, 7, requires_grad=True), torch.randn(6, 7)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: seen.append(s) or s, lambda s: s):
        twins(nn.L1Loss())[1](x, t)
    assert [(s.dtype, s.shape) for s in seen] == [(torch.int8, x.shape)]


def test_mse_broadcast_target_warns_like_native():
    for module in twins(nn.MSELoss()):
        with pytest.warns(UserWarning, match="different to the input size"):
            module(torch.randn(4, 3), torch.randn(4, 1))
    with pytest.warns(UserWarning, match="different to the input size"):
        assert_twins_agree(nn.MSELoss(), torch.randn(4, 3), torch.randn(4, 1))


LOSSES = {
    "mse": (nn.MSELoss, lambda g: torch.randn(8, 3, generator=g)),
    "l1": (nn.L1Loss, lambda g: torch.randn(8, 3, generator=g)),
    "huber": (lambda: nn.HuberLoss(delta=0.5), lambda g: torch.randn(8, 3, generator=g)),
    "bce": (lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0, 0.5])),
            lambda g: torch.rand(8, 3, generator=g)),
    "ce": (lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1, ignore_index=1),
           lambda g: torch.randint(3, (8,), generator=g)),
    "ce-probs": (nn.CrossEntropyLoss, lambda g: torch.rand(8, 3, generator=g).softmax(1)),
}


@pytest.mark.parametrize("name", LOSSES)
def test_swapped_loss_in_a_training_step_gives_native_grads(name):
    make_loss, make_target = LOSSES[name]
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 4, generator=gen), make_target(gen)
    params = {}
    for impl in layers.IMPLS:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        loss_fn = layers.swap(make_loss(), {"default": impl})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            loss_fn(model(x), t).backward()
            opt.step()
        params[impl] = [p.detach().clone() for p in model.parameters()]
    for pc, pn in zip(params["custom"], params["native"]):
        torch.testing.assert_close(pc, pn, **F32)


@pytest.mark.parametrize("name", LOSSES)
def test_per_sample_grads_with_vmap_match_a_loop_of_native(name):
    """vmap(grad) over inputs and targets, and over targets alone (a shared input): the generated vmap rule."""
    make_loss, make_target = LOSSES[name]
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 3, generator=gen, dtype=torch.float64), make_target(gen)
    t = t.double() if t.is_floating_point() else t
    native, custom = twins(make_loss().double())
    per_sample = torch.func.grad(lambda xi, ti: custom(xi[None], ti[None]))
    expected = torch.stack([torch.func.grad(lambda xi: native(xi[None], ti[None]))(xi) for xi, ti in zip(x, t)])
    torch.testing.assert_close(torch.func.vmap(per_sample)(x, t), expected, equal_nan=True)
    expected = torch.stack([torch.func.grad(lambda xi: native(xi[None], ti[None]))(x[0]) for ti in t])
    torch.testing.assert_close(torch.func.vmap(per_sample, in_dims=(None, 0))(x[0], t), expected, equal_nan=True)


@pytest.mark.parametrize("name", LOSSES)
def test_bfloat16_inputs_keep_native_dtypes(name):
    make_loss, make_target = LOSSES[name]
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 3, generator=gen).bfloat16(), make_target(gen)
    t = t.bfloat16() if t.is_floating_point() else t
    seen = {}
    for impl in layers.IMPLS:
        loss_fn = layers.swap(make_loss().bfloat16(), {"default": impl})
        seen[impl] = loss_and_grad(loss_fn, x, t)
    for c, n in zip(seen["custom"], seen["native"]):
        assert c.dtype == n.dtype
        torch.testing.assert_close(c.float(), n.float(), rtol=2e-2, atol=2e-2)


def test_autocast_training_step_runs_the_loss_in_float32_like_native():
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(16, 6, generator=gen), torch.randint(4, (16,), generator=gen)
    seen = {}
    for impl in layers.IMPLS:
        torch.manual_seed(0)
        model = nn.Linear(6, 4)
        loss_fn = layers.swap(nn.CrossEntropyLoss(label_smoothing=0.1), {"default": impl})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), t)
        loss.backward()
        seen[impl] = (loss, model.weight.grad)
    for c, n in zip(seen["custom"], seen["native"]):
        assert c.dtype == n.dtype
        torch.testing.assert_close(c, n, rtol=2e-2, atol=2e-2)
