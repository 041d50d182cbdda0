"""User twins checked without being told how: a case derived from the native class (``check_cases``),
and the facts `trainer layers` shows for them, measured on it (``facts``: double backward, vmap, compile).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.gradcheck import GradcheckError

from trainer import layers
from trainer.check.audit import CheckResult, as_function, gradcheck_case, prepare, saved_bytes_in_model, tolerance
from trainer.errors import ConfigError
from trainer.layers import Case, LayerSpec

# small values for the constructor arguments torch's layers require
SIZES = {"in_features": 4, "out_features": 3, "in_channels": 2, "out_channels": 3, "kernel_size": 3,
         "num_features": 4, "normalized_shape": 4, "num_embeddings": 10, "embedding_dim": 4,
         "num_groups": 2, "num_channels": 4, "embed_dim": 4, "num_heads": 2}
F64 = torch.float64


def check_cases(spec: LayerSpec, path: str = "LAYER") -> list[Case]:
    """The cases ``gradcheck`` runs for ``spec``: its own, or else one derived from its native class.

    Raises:
        ConfigError: no case can be derived (or every case is an edge case); the message
            names the ``cases=`` argument to add.
    """
    given = spec.cases()
    if given:
        checked = [c for c in given if c.gradcheck]
        if not checked:
            raise ConfigError(path, f"layer {spec.name!r} has only edge-value cases (gradcheck=False)",
                              suggestion="add one with gradcheck=True to its cases=")
        return checked
    return [derive_case(spec, path)]


def derive_case(spec: LayerSpec, path: str = "LAYER") -> Case:
    """A ``Case`` built from the native class alone: default arguments and an input it accepts.

    The native layer is built with its required constructor arguments from ``SIZES``
    (``in_features=4``, ``in_channels=2``, ...) and fed the first input it accepts, tried
    from what its attributes say (``Linear``: ``in_features`` columns; ``Conv2d``:
    ``(1, in_channels, 5, 5)``; a loss: an input and a target), then any-shape tensors
    (elementwise layers).
    """
    native = spec.native
    build, why = _builder(native)
    if build is not None:
        for make in _candidates(build()):
            try:
                with torch.no_grad():
                    out = build().to(F64)(*make(torch.Generator().manual_seed(0)))
            except Exception as e:  # a wrong guess: try the next shape
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                continue
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                return Case(f"{spec.name}-derived", build, make)
            why = f"its output is {type(out).__name__}, not a floating tensor"
    example = (f"cases=[Case({spec.name!r}, lambda: {native.__name__}(...), "
               f"lambda g: (torch.randn(3, 5, dtype=torch.float64, generator=g),))]")
    raise ConfigError(path, f"layer {spec.name!r} has no cases, and none could be derived from "
                            f"{native.__name__} ({why})",
                      suggestion=f"pass {example} to layers.register (Case is trainer.layers.Case)")


def _builder(native: type[nn.Module]) -> tuple[Callable[[], nn.Module] | None, str]:
    """A zero-argument constructor of ``native`` (required arguments filled from ``SIZES``), or why not."""
    try:
        params = inspect.signature(native).parameters.values()
    except (TypeError, ValueError):
        return native, ""
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [n for n in required if n not in SIZES]
    if missing:
        return None, f"{native.__name__}() needs {', '.join(missing)}"
    kwargs = {n: SIZES[n] for n in required}
    return (functools.partial(native, **kwargs) if kwargs else native), ""


def _randn(*shapes: tuple[int, ...], target: str = "randn") -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    """Float64 normal inputs of ``shapes``; for a loss, the last one is a target of kind ``target``."""
    def make(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        xs = [torch.randn(s, dtype=F64, generator=gen) for s in shapes]
        if target == "index":       # class indices for the first input's dim 1
            xs[-1] = torch.randint(0, shapes[0][1], shapes[-1], generator=gen)
        elif target == "unit":      # probabilities / binary labels in [0, 1)
            xs[-1] = torch.rand(shapes[-1], dtype=F64, generator=gen)
        return tuple(xs)
    return make


def _candidates(module: nn.Module) -> list[Callable[[torch.Generator], tuple[torch.Tensor, ...]]]:
    """Input builders to try, most specific first, from what the module's attributes say it expects."""
    kinds = " ".join(c.__name__ for c in type(module).__mro__)
    if isinstance(module, nn.modules.loss._Loss):
        if "CrossEntropy" in kinds or "NLL" in kinds:
            return [_randn((3, 5), (3,), target="index")]
        return [_randn((3, 5), (3, 5), target="unit" if "BCE" in kinds else "randn")]
    if hasattr(module, "num_embeddings"):
        n = module.num_embeddings
        return [lambda gen: (torch.randint(0, n, (3, 5), generator=gen),)]
    found = []
    if hasattr(module, "in_features"):
        found.append(_randn((3, module.in_features)))
    if hasattr(module, "in_channels"):
        dims = len(getattr(module, "kernel_size", (3, 3)))
        found.append(_randn((1, module.in_channels, *[5] * dims)))
    for attr in ("num_features", "num_channels"):
        if hasattr(module, attr):
            c = getattr(module, attr)
            found += [_randn((4, c)), _randn((2, c, 4, 4)), _randn((2, c, 3, 4, 4))]
    if hasattr(module, "normalized_shape"):
        found.append(_randn((3, *module.normalized_shape)))
    return found + [_randn((3, 5)), _randn((2, 3, 4, 4))]


def saved_per_element(spec: LayerSpec) -> str:
    """``custom/native`` bytes autograd saves per input element inside Linear -> layer -> Linear, on the
    layer's first case (given or derived); ``-`` with no case, or where the twin fails to run."""
    try:
        case = (spec.cases() or check_cases(spec))[0]
        numel = case.inputs(torch.Generator().manual_seed(0))[0].numel()
        custom, native = (saved_bytes_in_model(spec, case, impl) / numel for impl in ("custom", "native"))
    except ConfigError:
        return "-"
    except Exception:
        if spec.builtin:
            raise
        return "-"  # a user twin that fails to run: its facts say "no"
    return f"{custom:.3g}/{native:.3g}"


def facts(spec: LayerSpec) -> dict[str, str]:
    """What the twin supports, as shown by ``trainer layers``.

    A built-in's declared flags stand (tests/test_layers.py checks each of them). A user twin
    is measured, once per process, on its first case (given or derived), in float64:

    - double backward: ``gradgradcheck`` passes;
    - vmap: ``torch.func.vmap`` over a batch of two equals the two calls, and
      ``torch.func.jacrev`` equals native's;
    - compile: ``torch.compile(fullgraph=True, backend="aot_eager")`` traces forward and
      backward without a graph break, and output and grads equal eager's.

    Each is ``yes``, ``no`` (raises), ``wrong`` (runs, but disagrees) or ``unchecked``
    (no case to run it on).
    """
    if spec.builtin:
        return {flag: "yes" if getattr(spec, flag) else "no" for flag in ("double_backward", "vmap", "compile")}
    return dict(_measured(spec))


@functools.lru_cache(maxsize=None)
def _measured(spec: LayerSpec) -> tuple[tuple[str, str], ...]:
    try:
        case = check_cases(spec)[0]
    except ConfigError:
        return tuple((flag, "unchecked") for flag in ("double_backward", "vmap", "compile"))
    checks = {"double_backward": _double_backward, "vmap": _vmap, "compile": _compile}
    return tuple((flag, _verdict(check, spec, case)) for flag, check in checks.items())


def _verdict(check: Callable[[LayerSpec, Case], bool], spec: LayerSpec, case: Case) -> str:
    try:
        return "yes" if check(spec, case) else "wrong"
    except GradcheckError:
        return "wrong"
    except Exception:  # the transform or the compiler refused the twin
        return "no"


def _close(a, b, spec: LayerSpec) -> bool:
    try:
        torch.testing.assert_close(a, b, equal_nan=True, **tolerance(spec, F64))
    except AssertionError:
        return False
    return True


def _double_backward(spec: LayerSpec, case: Case) -> bool:
    fn, args = as_function(*prepare(spec, case, F64, "custom"))
    out = fn(*args)
    v = torch.randn_like(out, requires_grad=True)  # grads depend on v, even where the twin's 2nd derivative is 0
    grads = torch.autograd.grad(out, args, v, create_graph=True, allow_unused=True)
    sum(g.sum() for g in grads if g is not None).backward()  # raises where backward is once-differentiable
    return torch.autograd.gradgradcheck(fn, args, fast_mode=True)


def _vmap(spec: LayerSpec, case: Case) -> bool:
    module, _ = prepare(spec, case, F64, "custom")
    samples = [prepare(spec, case, F64, "custom", seed=s)[1] for s in (1, 2)]
    batched = [torch.stack([a.detach(), b.detach()]) for a, b in zip(*samples)]
    looped = torch.stack([module(*(t.detach() for t in s)) for s in samples])
    if not _close(torch.func.vmap(module, randomness="same")(*batched), looped, spec):
        return False
    jacobians = {}
    for impl in ("custom", "native"):
        fn, args = as_function(*prepare(spec, case, F64, impl))
        jacobians[impl] = torch.func.jacrev(fn, argnums=tuple(range(len(args))))(*args)
    return _close(jacobians["custom"], jacobians["native"], spec)


def _compile(spec: LayerSpec, case: Case) -> bool:
    results = []
    for compiled in (False, True):
        module, inputs = prepare(spec, case, F64, "custom")
        run = torch.compile(module, fullgraph=True, backend="aot_eager") if compiled else module
        with torch.random.fork_rng(devices=[]):  # a random layer draws the same mask both times
            torch.manual_seed(0)
            out = run(*inputs)
        wrt = [t for t in (*inputs, *module.parameters()) if t.requires_grad]
        grads = torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)
        results.append((out, grads))
    return _close(results[1], results[0], spec)


def gradcheck_layers(names: list[str] | None = None, device: torch.device | str = "cpu") -> list[CheckResult]:
    """gradcheck every case of the named layers (all of them by default), on ``device``.

    A layer registered without cases is checked on a case derived from its native class
    (``probe.check_cases``), which raises a ``ConfigError`` saying what to add where none can be.
    """
    specs = [layers.get(n) for n in names] if names else layers.specs()
    return [r for spec in specs for case in check_cases(spec) for r in gradcheck_case(spec, case, device)]
