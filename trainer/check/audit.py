"""Checks of the twins themselves: gradcheck/gradgradcheck in float64, saved bytes, proof the custom path ran."""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainer import layers
from trainer.checkpoint import reseed
from trainer.layers import Case, LayerSpec


@dataclass
class CheckResult:
    layer: str
    case: str
    check: str          # "gradcheck" | "gradgradcheck" | "once_differentiable"
    ok: bool
    seconds: float
    message: str = ""


def tolerance(spec: LayerSpec, dtype: torch.dtype) -> dict[str, float]:
    """``assert_close`` tolerances of a twin against native in ``dtype`` (custom-functions.md section 7),
    looser for reductions (``spec.reduction``); bfloat16 for any other dtype."""
    if dtype == torch.float64:
        return dict(rtol=1e-6, atol=1e-6) if spec.reduction else dict(rtol=1e-7, atol=1e-7)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5) if spec.reduction else dict(rtol=1.3e-6, atol=1e-5)
    if dtype == torch.float16:
        return dict(rtol=1e-2, atol=1e-2) if spec.reduction else dict(rtol=1e-3, atol=1e-3)
    return dict(rtol=5e-2, atol=2e-2) if spec.reduction else dict(rtol=1.6e-2, atol=1e-2)


def prepare(spec: LayerSpec, case: Case, dtype: torch.dtype = torch.float64, impl: str = "native",
            seed: int = 0, device: torch.device | str = "cpu") -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The case's module (same weights for every impl, given the seed) and fresh inputs that require grad.

    Weights and inputs are drawn on the CPU and then moved, so every device sees the same values.
    """
    torch.manual_seed(seed)
    module = case.module().to(dtype).train(case.train).to(device)
    layers.swap(module, {spec.name: impl})
    gen = torch.Generator().manual_seed(seed)
    inputs = tuple(
        t.to(device, dtype).requires_grad_() if t.is_floating_point() else t.to(device) for t in case.inputs(gen)
    )
    return module, inputs


def as_function(module: nn.Module, inputs: tuple[torch.Tensor, ...], seed: int = 0
                ) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """``module(*inputs)`` as a function of its floating inputs and trainable parameters.

    The RNG is reseeded on each call, so a random layer (dropout) draws the same mask
    every time and finite differences mean something.
    """
    diff = [i for i, t in enumerate(inputs) if t.is_floating_point() and t.requires_grad]
    device = inputs[0].device
    names = [n for n, p in module.named_parameters() if p.requires_grad]

    def fn(*args: torch.Tensor) -> torch.Tensor:
        xs = list(inputs)
        for j, i in enumerate(diff):
            xs[i] = args[j]
        params = dict(zip(names, args[len(diff):]))
        # fresh buffers each call: running statistics must not drift between calls, nor be
        # mutated in place under torch.func transforms (which forbid it)
        params.update({n: b.clone() for n, b in module.named_buffers()})
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            reseed(device, seed)
            return torch.func.functional_call(module, params, tuple(xs))

    args = tuple(inputs[i] for i in diff) + tuple(dict(module.named_parameters())[n] for n in names)
    return fn, args


def gradcheck_case(spec: LayerSpec, case: Case, device: torch.device | str = "cpu") -> list[CheckResult]:
    """``gradcheck`` and ``gradgradcheck`` (contiguous and non-contiguous grad_outputs) in float64.

    gradcheck compares every Jacobian entry (slow mode) up to 64 input elements and random
    projections (``fast_mode``) above; gradgradcheck always uses fast mode, as PyTorch's own
    test wrapper does. ``check_batched_grad`` when the twin supports vmap; ``check_forward_ad``
    when its Function defines ``jvp``. A twin declared once-differentiable must instead raise
    on double backward; one that declares nothing (a user twin) gets gradgradcheck, and
    batched grads are checked only where vmap is declared. Warnings the cases provoke on
    purpose (``dim=None``) are silenced.
    """
    module, inputs = prepare(spec, case, torch.float64, "custom", device=device)
    fn, args = as_function(module, inputs)
    fast = sum(a.numel() for a in args) > 64
    # cuDNN's and atomics-based CUDA backward kernels sum in no fixed order (PyTorch's own tests allow this too)
    nondet_tol = 1e-12 if inputs[0].is_cuda else 0.0
    forward_ad = "jvp" in vars(getattr(type(module), "function", object))
    batched = bool(spec.vmap)
    results = []

    def run(check: str, call: Callable[[], object]) -> None:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                call()
            ok, message = True, ""
        except Exception as e:  # gradcheck raises GradcheckError (a RuntimeError) with the Jacobians
            ok, message = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        results.append(CheckResult(spec.name, case.id, check, ok, time.perf_counter() - start, message))

    run("gradcheck", lambda: torch.autograd.gradcheck(
        fn, args, fast_mode=fast, check_batched_grad=batched, check_grad_dtypes=True,
        check_forward_ad=forward_ad, nondet_tol=nondet_tol))
    if spec.double_backward is not False:
        for non_contig in (False, True):
            run("gradgradcheck" + ("-noncontig" if non_contig else ""), lambda: torch.autograd.gradgradcheck(
                fn, args, fast_mode=True, check_batched_grad=batched, check_grad_dtypes=True,
                gen_non_contig_grad_outputs=non_contig, nondet_tol=nondet_tol))
    else:
        run("once_differentiable", lambda: _double_backward_raises(fn, args))
    return results


def _double_backward_raises(fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...]) -> None:
    out = fn(*args)
    grads = torch.autograd.grad(out, args, torch.randn_like(out), create_graph=True, allow_unused=True)
    total = sum(g.sum() for g in grads if g is not None)
    try:
        total.backward()
    except RuntimeError:
        return
    raise AssertionError("declared once-differentiable, but double backward did not raise")


def backward_node_names(output: torch.Tensor) -> set[str]:
    """The class names of every node in ``output``'s backward graph (``ReLUFunctionBackward``, ...)."""
    seen, todo, names = set(), [output.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def saved_bytes_in_model(spec: LayerSpec, case: Case, impl: str, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the distinct storages autograd saves for ``pre -> layer -> post`` on one of the layer's cases."""
    module, inputs = prepare(spec, case, dtype, impl)
    return saved_bytes(module, inputs)


def saved_bytes(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the distinct storages autograd saves for ``pre -> module -> post``.

    ``pre`` and ``post`` multiply by a scalar parameter, so, like the Linear layers around
    an activation in a real model, ``post`` keeps the layer's output alive anyway. Each
    storage counts once; parameters, buffers and the model's input are left out.
    """
    dtype = next((t.dtype for t in inputs if t.is_floating_point()), torch.float32)
    a = torch.tensor(1.5, dtype=dtype, requires_grad=True)
    b = torch.tensor(0.5, dtype=dtype, requires_grad=True)
    excluded = {t.untyped_storage().data_ptr() for t in (*inputs, *module.parameters(), *module.buffers(), a, b)}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.random.fork_rng(devices=[]):
        first = inputs[0] * a if inputs[0].is_floating_point() else inputs[0]
        out = module(first, *inputs[1:])
        (out * b).sum()
    return sum(storages.values())


def native_per_element(spec: LayerSpec, case: Case, g: torch.Tensor, dtype: torch.dtype = torch.float64,
                       device: torch.device | str = "cpu", autocast: torch.dtype | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Native's output and input grad for an edge case (``case.edges``), each element computed alone.

    A 1-element tensor runs a CPU kernel's scalar loop, a longer one its vectorized loop, and
    the two may differ at ±inf and NaN (which elements fall in the vectorized part depends on
    the CPU): where they do, both are native's answer. ``g`` is the grad_output, shaped as the output.
    """
    module, (x,) = prepare(spec, case, dtype, "native", device=device)
    outs, grads = [], []
    for xi, gi in zip(x.detach().flatten(), g.flatten()):
        xi = xi.reshape(1).requires_grad_()
        with torch.autocast(torch.device(device).type, dtype=autocast or torch.float32, enabled=autocast is not None):
            yi = module(xi)
        outs.append(yi.detach())
        grads.append(torch.autograd.grad(yi, xi, gi.reshape(1).to(yi.dtype))[0])
    return torch.cat(outs).view(x.shape), torch.cat(grads).view(x.shape)


def close_to_either(got: torch.Tensor, first: torch.Tensor, second: torch.Tensor, tol: dict[str, float]
                    ) -> torch.Tensor:
    """Elementwise: ``got`` within ``tol`` of ``first`` or of ``second`` (NaN matches NaN)."""
    got, first, second = got.double(), first.double(), second.double()
    return torch.isclose(got, first, equal_nan=True, **tol) | torch.isclose(got, second, equal_nan=True, **tol)
