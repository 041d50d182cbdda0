"""What the per-layer harness cannot express for batch_norm, layer_norm and dropout: state, RNG, errors, dtypes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainer import layers
from trainer.twins.dropout import DropoutFunction
from trainer.twins.norm import BatchNormFunction, LayerNormFunction


def twins(native: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``native`` and a custom copy of it, with the same parameters and buffers."""
    return native, layers.swap(copy.deepcopy(native), {"default": "custom"})


def randomized(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    return m


BN_CONFIGS = {
    "1d-NC": (lambda: nn.BatchNorm1d(3), (8, 3)),
    "1d-NCL": (lambda: nn.BatchNorm1d(3, momentum=0.3), (4, 3, 5)),
    "2d": (lambda: nn.BatchNorm2d(4), (4, 4, 5, 5)),
    "2d-momentum-none": (lambda: nn.BatchNorm2d(4, momentum=None), (2, 4, 3, 3)),
    "2d-affine-false": (lambda: nn.BatchNorm2d(4, affine=False), (2, 4, 3, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", BN_CONFIGS.values(), ids=BN_CONFIGS.keys())
def test_batch_norm_running_stats_then_eval_match_native(config, dtype):
    build, shape = config
    native, custom = twins(randomized(build().to(dtype)))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(*shape, generator=gen, dtype=dtype) * 2 + 1
        native(x), custom(x)
    assert custom.num_batches_tracked.item() == native.num_batches_tracked.item() == 5
    # the update mirrors native's arithmetic; the batch stats differ only in summation order
    tol = dict(rtol=2e-7, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(custom.running_mean, native.running_mean, **tol)
    torch.testing.assert_close(custom.running_var, native.running_var, **tol)

    native.eval(), custom.eval()
    x = torch.randn(*shape, dtype=dtype, generator=gen, requires_grad=True)
    g = torch.randn(*shape, dtype=dtype, generator=gen)
    grads = [torch.autograd.grad(m(x), (x, *m.parameters()), g) for m in (native, custom)]
    for gn, gc in zip(*grads):
        torch.testing.assert_close(gc, gn, rtol=1e-5, atol=1e-5)
    assert custom.num_batches_tracked.item() == 5  # eval updates nothing


@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (1, 3)), (nn.BatchNorm1d, (1, 3, 1)),
                                       (nn.BatchNorm2d, (1, 3, 1, 1))])
def test_batch_norm_one_value_per_channel_raises_like_native_in_training(cls, shape):
    native, custom = twins(cls(3))
    x = torch.randn(*shape)
    with pytest.raises(ValueError) as native_error:
        native(x)
    with pytest.raises(ValueError) as custom_error:
        custom(x)
    assert str(custom_error.value) == str(native_error.value)
    native.eval(), custom.eval()
    torch.testing.assert_close(custom(x), native(x))  # eval uses the running stats: fine


def test_batch_norm_function_batched_grads_and_vmap():
    """The Function batches its grads (gradcheck with check_batched_grad) and vmaps, in training and eval."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, generator=gen).add(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    train = lambda x, w, b: BatchNormFunction.apply(x, w, b, None, None, 1e-5)[0]  # noqa: E731
    evaluate = lambda x, w, b: BatchNormFunction.apply(x, w, b, rm, rv, 1e-5)[0]  # noqa: E731
    for fn in (train, evaluate):
        assert torch.autograd.gradcheck(fn, (x, w, b), check_batched_grad=True)
        assert torch.autograd.gradgradcheck(fn, (x, w, b), check_batched_grad=True)

    xs = torch.randn(5, 4, 3, 2, dtype=torch.float64, generator=gen)
    native = torch.stack([nn.functional.batch_norm(xi, None, None, w, b, training=True) for xi in xs])
    torch.testing.assert_close(torch.func.vmap(train, (0, None, None))(xs, w, b), native)


def test_norm_statistics_outputs_are_native_and_differentiable():
    """The statistics each Function returns beside y are native's, and their grads are right (double backward
    of y reaches x through them)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(5, dtype=torch.float64, generator=gen).add(0.5).requires_grad_()
    b = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    _, mean, rstd = LayerNormFunction.apply(x, w, b, 1, 1e-5)
    _, mean_n, rstd_n = torch.native_layer_norm(x, (5,), w, b, 1e-5)
    torch.testing.assert_close((mean, rstd), (mean_n, rstd_n))
    _, mean, var = BatchNormFunction.apply(x, w[:3], b[:3], None, None, 1e-5)
    torch.testing.assert_close(mean.flatten(), x.mean((0, 2)))
    torch.testing.assert_close(var.flatten(), x.var((0, 2), correction=0))

    r = [torch.randn(s, dtype=torch.float64, generator=gen) for s in ((4, 3, 5), (4, 3, 1), (1, 3, 1))]

    def layer_norm(x, w, b):
        y, mean, rstd = LayerNormFunction.apply(x, w, b, 1, 1e-5)
        return (y * r[0]).sum() + (mean * r[1]).sum() + (rstd * r[1]).sum()

    def batch_norm(x, w, b):
        y, mean, var = BatchNormFunction.apply(x, w[:3], b[:3], None, None, 1e-5)
        return (y * r[0]).sum() + (mean * r[2]).sum() + (var * r[2]).sum()

    for fn in (layer_norm, batch_norm):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_layer_norm_and_batch_norm_bf16_input_fp32_params_match_native_dtypes():
    """A bf16 activation into fp32 params (as after an autocast matmul): native returns bf16, computes in fp32."""
    for build, shape in ((lambda: nn.LayerNorm(16), (4, 16)), (lambda: nn.BatchNorm1d(4), (8, 4, 3))):
        native, custom = twins(randomized(build()))
        x = torch.randn(*shape).bfloat16().requires_grad_()
        g = torch.randn(*shape).bfloat16()
        outs = [(m(x), *torch.autograd.grad(m(x), (x, *m.parameters()), g)) for m in (native, custom)]
        for tn, tc in zip(*outs):
            assert tc.dtype == tn.dtype
            torch.testing.assert_close(tc.float(), tn.float(), rtol=2e-2, atol=2e-2)
        if isinstance(native, nn.BatchNorm1d):
            torch.testing.assert_close(custom.running_var, native.running_var)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (4, 7), (3, 5, 17), (64, 129)])
@pytest.mark.parametrize("p", [0.1, 0.37, 0.9])
def test_dropout_mask_rng_use_and_grads_match_native_bitwise_for_the_same_seed(p, shape, dtype):
    native, custom = twins(nn.Dropout(p))
    x = (torch.randn(*shape) + 3).to(dtype).requires_grad_()  # no zeros: y == 0 exactly where dropped
    g = torch.randn(*shape).to(dtype)
    results = []
    for m in (native, custom):
        torch.manual_seed(7)
        y = m(x)
        results.append((y, torch.rand(3), *torch.autograd.grad(y, x, g)))  # rand: the RNG advanced alike
    for tn, tc in zip(*results):
        assert torch.equal(tc, tn)


def test_dropout_keeps_natives_signed_zeros_and_nans_where_it_drops():
    native, custom = twins(nn.Dropout(0.5))
    x = torch.tensor([-2.0, float("inf"), float("-inf"), float("nan"), -0.0, 3.0] * 8)
    outs = []
    for m in (native, custom):
        torch.manual_seed(0)
        outs.append(m(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(outs[1].signbit(), outs[0].signbit())


def test_dropout_mask_matches_native_for_a_noncontiguous_input():
    native, custom = twins(nn.Dropout(0.4))
    x = torch.randn(6, 10)[:, ::2] + 3
    outs = []
    for m in (native, custom):
        torch.manual_seed(3)
        outs.append(m(x))
    assert torch.equal(outs[0], outs[1])


def test_dropout_p1_gives_zero_finite_grads_and_draws_nothing():
    _, custom = twins(nn.Dropout(1.0))
    x = torch.randn(5, 6, requires_grad=True)
    state = torch.get_rng_state()
    y = custom(x)
    assert torch.equal(torch.get_rng_state(), state)
    (dx,) = torch.autograd.grad(y, x, torch.randn(5, 6))
    assert torch.isfinite(dx).all() and not dx.any()
    assert not y.any()


def test_dropout_identity_is_a_zero_copy_view_and_draws_nothing():
    for p, train in ((0.0, True), (0.5, False)):
        _, custom = twins(nn.Dropout(p).train(train))
        x = torch.randn(4, 5, requires_grad=True)
        state = torch.get_rng_state()
        y = custom(x)
        assert torch.equal(torch.get_rng_state(), state)
        assert y.data_ptr() == x.data_ptr() and type(y.grad_fn).__name__ == "DropoutFunctionBackward"
        g = torch.randn(4, 5)
        assert torch.equal(torch.autograd.grad(y, x, g)[0], g)


def test_dropout_under_vmap_follows_the_randomness_mode():
    x = torch.randn(3, 8) + 3
    fn = lambda t: DropoutFunction.apply(t, 0.5, True)[0]  # noqa: E731
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(fn)(x)
    same = torch.func.vmap(fn, randomness="same")(x)
    assert torch.equal(same[0] == 0, same[1] == 0)
    different = torch.func.vmap(fn, randomness="different")(torch.ones(16, 64))
    assert not torch.equal(different[0], different[1])
