"""One parametrized walk over every registry layer: its twin against the native layer, case by case."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from trainer import layers
from trainer.check.audit import (as_function, backward_node_names, close_to_either, gradcheck_case, native_per_element,
                           prepare, saved_bytes_in_model, tolerance)

CASES = [(spec, case) for spec in layers.specs() for case in spec.cases()]
IDS = [f"{spec.name}:{case.id}" for spec, case in CASES]
GRADCHECK = [(s, c) for s, c in CASES if c.gradcheck]
GRADCHECK_IDS = [f"{s.name}:{c.id}" for s, c in GRADCHECK]
FIRST = [(s, next(c for c in s.cases() if c.gradcheck)) for s in layers.specs() if any(c.gradcheck for c in s.cases())]
FIRST_IDS = [f"{s.name}:{c.id}" for s, c in FIRST]  # one case per layer, for checks that cost a compile


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor whose last dimension has stride 2."""
    if t.dim() == 0 or t.numel() == 0:
        return t
    base = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
    view = base[..., ::2]
    view.copy_(t.detach())
    assert not view.is_contiguous()
    return view.requires_grad_(t.requires_grad)


def run(spec, case, dtype, impl, *, transform=lambda t: t, grad_out=None, wants=None):
    """Forward and backward of one impl: (output, grads of every differentiable input and param, node names,
    module class, grad_output)."""
    module, inputs = prepare(spec, case, dtype, impl)
    inputs = tuple(transform(t) for t in inputs)
    fn, args = as_function(module, inputs, seed=1)
    if wants is not None:
        args = tuple(a.detach().requires_grad_(i in wants) for i, a in enumerate(args))
    out = fn(*args)
    g = grad_out(out) if grad_out else torch.randn(out.shape, dtype=out.dtype,
                                                   generator=torch.Generator().manual_seed(2))
    need = [a for a in args if a.requires_grad]
    grads = torch.autograd.grad(out, need, g, allow_unused=True) if need and out.requires_grad else ()
    return out, grads, backward_node_names(out), type(module), g


def assert_matches_either(got, first, second, tol, what):
    """Each element of ``got`` close to ``first``'s or ``second``'s (the same where native agrees with itself)."""
    bad = (~close_to_either(got, first, second, tol)).nonzero().flatten().tolist()
    assert not bad, (f"{what} at {bad}: custom {got[bad].tolist()}, "
                     f"native {first[bad].tolist()} or {second[bad].tolist()}")


def assert_same(spec, case, dtype, **kw):
    out_n, grads_n, nodes_n, _, g = run(spec, case, dtype, "native", **kw)
    out_c, grads_c, nodes_c, cls, _ = run(spec, case, dtype, "custom", **kw)
    tol = tolerance(spec, dtype)
    assert len(grads_c) == len(grads_n)
    if case.edges:  # native may disagree with itself at an edge value: either of its answers is native's
        out_e, grad_e = native_per_element(spec, case, g, dtype)
        assert_matches_either(out_c, out_n, out_e, tol, "output")
        if grads_c:
            assert_matches_either(grads_c[0], grads_n[0], grad_e, tol, "grad 0")
    else:
        torch.testing.assert_close(out_c, out_n, equal_nan=True, **tol, msg=lambda m: f"output: {m}")
        for i, (gc, gn) in enumerate(zip(grads_c, grads_n)):
            torch.testing.assert_close(gc, gn, equal_nan=True, **tol, msg=lambda m: f"grad {i}: {m}")
    if out_c.requires_grad:  # proof the custom path ran, and only in the custom model
        node = f"{cls.function.__name__}Backward"
        assert node in nodes_c and node not in nodes_n


@pytest.mark.parametrize("spec,case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_parity_with_native(spec, case, dtype):
    assert_same(spec, case, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_edge_values_match_native_whatever_kernels_the_cpu_runs(capability):
    """The edge cases again with ATen's kernels built for another instruction set (its vectorized loops
    differ): the checks above may only compare what every x86-64 CPU computes alike."""
    if capability == "AVX2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", __file__,
                           "-k", "edges"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]


@pytest.mark.parametrize("spec,case", CASES, ids=IDS)
def test_parity_noncontiguous_input_and_grad_output(spec, case):
    assert_same(spec, case, torch.float64, transform=noncontiguous,
                grad_out=lambda out: noncontiguous(torch.randn(out.shape, dtype=out.dtype)))


@pytest.mark.parametrize("spec,case", CASES, ids=IDS)
def test_parity_stride0_grad_output(spec, case):
    assert_same(spec, case, torch.float64, grad_out=lambda out: torch.tensor(0.7, dtype=out.dtype).expand(out.shape))


@pytest.mark.parametrize("spec,case", CASES, ids=IDS)
def test_parity_when_only_some_inputs_need_grad(spec, case):
    module, inputs = prepare(spec, case)
    _, args = as_function(module, inputs)
    for i in range(len(args)):
        assert_same(spec, case, torch.float64, wants={i})


@pytest.mark.parametrize("spec,case", GRADCHECK, ids=GRADCHECK_IDS)
def test_gradcheck(spec, case):
    failed = [r for r in gradcheck_case(spec, case) if not r.ok]
    assert not failed, "\n".join(f"{r.check}: {r.message}" for r in failed)


@pytest.mark.parametrize("spec,case", CASES, ids=IDS)
def test_saves_no_more_than_native_inside_a_model(spec, case):
    custom = saved_bytes_in_model(spec, case, "custom")
    native = saved_bytes_in_model(spec, case, "native")
    assert custom <= native, f"custom saves {custom} bytes, native {native}"


@pytest.mark.slow
@pytest.mark.parametrize("spec,case", FIRST, ids=FIRST_IDS)
def test_compiled_fullgraph_matches_eager(spec, case):
    if not spec.compile:
        pytest.skip(f"{spec.name} is declared not to compile")
    import torch._dynamo
    import torch._inductor.config
    torch._dynamo.reset()
    module, inputs = prepare(spec, case, torch.float32, "custom")
    eager_fn, args = as_function(module, inputs, seed=1)
    compiled = torch.compile(module, fullgraph=True)

    torch.manual_seed(1)
    with torch._inductor.config.patch(fallback_random=True):  # the same dropout masks as eager
        out_c = compiled(*inputs)
    grads_c = torch.autograd.grad(out_c.sum(), args)
    out_e = eager_fn(*args)
    grads_e = torch.autograd.grad(out_e.sum(), args)
    torch.testing.assert_close(out_c, out_e, **tolerance(spec, torch.float32))
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, **tolerance(spec, torch.float32))


@pytest.mark.slow
@pytest.mark.parametrize("spec,case", GRADCHECK, ids=GRADCHECK_IDS)
def test_jacrev_matches_native(spec, case):
    if not spec.vmap:
        pytest.skip(f"{spec.name} is declared not to support vmap")
    jacobians = {}
    for impl in layers.IMPLS:
        module, inputs = prepare(spec, case, torch.float64, impl)
        fn, args = as_function(module, inputs, seed=1)
        jacobians[impl] = torch.func.jacrev(fn, argnums=tuple(range(len(args))))(*args)
    for jc, jn in zip(jacobians["custom"], jacobians["native"]):
        torch.testing.assert_close(jc, jn, **tolerance(spec, torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("spec,case", GRADCHECK, ids=GRADCHECK_IDS)
def test_autocast_bf16_dtypes_match_native(spec, case):
    seen = {}
    for impl in layers.IMPLS:
        module, inputs = prepare(spec, case, torch.float32, impl)
        fn, args = as_function(module, inputs, seed=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*args)
        grads = torch.autograd.grad(out.float().sum(), args, allow_unused=True)
        seen[impl] = (out, grads)
    (out_n, grads_n), (out_c, grads_c) = seen["native"], seen["custom"]
    assert out_c.dtype == out_n.dtype
    torch.testing.assert_close(out_c.float(), out_n.float(), **tolerance(spec, torch.bfloat16))
    for gc, gn in zip(grads_c, grads_n):
        assert (gc is None) == (gn is None)
        if gc is not None:
            assert gc.dtype == gn.dtype
            torch.testing.assert_close(gc.float(), gn.float(), **tolerance(spec, torch.bfloat16))
