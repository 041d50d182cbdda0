"""How a twin calls its Function: autocast as native would see it, and a fast path past ``Function.apply``.

Autocast casts op by op inside a Function's forward but not in its backward, so a twin
whose forward ran under autocast would see mixed dtypes in backward (custom-functions.md
section 5). Instead the twin's module casts its inputs once, the way autocast treats the
native op on that device (the policy), and the Function runs with autocast off in both
directions: the same contract as ``torch.amp.custom_fwd(cast_inputs=...)``, which cannot
be combined with ``setup_context`` (pytorch#132388).

``Function.apply``'s Python wrapper binds the arguments against ``forward``'s signature and
checks for functorch on every call, a fixed cost that doubles a small layer's time. When
every argument is given, nothing is being compiled and no torch.func transform is active,
that binding is a no-op, so the twin calls the C++ ``apply`` underneath directly; in every
other case it goes through ``Function.apply`` as usual.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

# Policies, by device type: "lower" runs in the autocast dtype (linear, conv), "fp32" in
# float32 (losses; on CUDA also norms and softmax), absent means the input dtype is kept.
LOWER = {"cpu": "lower", "cuda": "lower"}
FP32 = {"cpu": "fp32", "cuda": "fp32"}
FP32_ON_CUDA = {"cuda": "fp32"}
KEEP: Mapping[str, str] = {}

LOW = (torch.float16, torch.bfloat16)  # computed in float32 and rounded once, as native kernels do


def opmath(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in the dtype native kernels compute in: float32 for half types, else ``t`` itself (None stays None)."""
    return t.float() if t is not None and t.dtype in LOW else t


def as_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype``, without a copy when it already is (None stays None: a grad not asked for)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)

_C_APPLY = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")
_FAST: dict[type, tuple[object, int]] = {}


def apply(function: type[torch.autograd.Function], policy: Mapping[str, str], *args):
    """``function.apply(*args)``, casting floating tensor args per ``policy`` when autocast is on."""
    device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
    if not torch.is_autocast_enabled(device):
        return call(function, args)
    rule = policy.get(device)
    if rule is not None:
        dtype = torch.get_autocast_dtype(device) if rule == "lower" else torch.float32
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with torch.autocast(device, enabled=False):
        return call(function, args)


def call(function: type[torch.autograd.Function], args: tuple):
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    fast = _FAST.get(function)
    if fast is None:
        fast = _FAST[function] = _fast_path(function)
    bound, arity = fast
    return bound(*args) if bound is not None and len(args) == arity else function.apply(*args)


def _fast_path(function: type[torch.autograd.Function]) -> tuple[object, int]:
    """The C++ apply bound to ``function`` and ``forward``'s arity, or (None, -1) where not applicable."""
    params = inspect.signature(function.forward).parameters.values()
    simple = all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
    if _C_APPLY is None or "setup_context" not in vars(function) or not simple:
        return None, -1
    return _C_APPLY.__get__(None, function), len(params)
