"""How a twin calls its Function under autocast, and half types computed in float32. A twin casts its inputs once,
as autocast treats the native op (the policy), and runs its Function with autocast off both ways: the contract of
``torch.amp.custom_fwd(cast_inputs=...)``, which cannot go with ``setup_context`` (pytorch#132388)."""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch

# Policies by device type: "lower" runs in the autocast dtype, "fp32" in float32, absent keeps the input dtype
LOWER = {"cpu": "lower", "cuda": "lower"}
FP32 = {"cpu": "fp32", "cuda": "fp32"}
FP32_ON_CUDA = {"cuda": "fp32"}
KEEP: Mapping[str, str] = {}

LOW = (torch.float16, torch.bfloat16)  # computed in float32 and rounded once, as native kernels do


def opmath(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in the dtype native kernels compute in: float32 for half types, else ``t`` itself (None stays None)."""
    return t.float() if t is not None and t.dtype in LOW else t


def in_float32(fn: Callable) -> Callable:
    """A forward formula ``fn`` computed in float32 when a tensor argument is half or bfloat16, its output rounded
    once to that dtype, as native kernels compute ("opmath"); in any other dtype ``fn`` runs as it is. A backward
    reads its saved tensors and g through ``opmath`` instead: autograd rounds each grad to its input's dtype."""
    @functools.wraps(fn)
    def wrapped(*args):
        low = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in LOW), None)
        if low is None:
            return fn(*args)
        return fn(*(opmath(a) if isinstance(a, torch.Tensor) else a for a in args)).to(low)
    return wrapped


def apply(function: type[torch.autograd.Function], policy: Mapping[str, str], *args):
    """``function.apply(*args)``, casting floating tensor args per ``policy`` when autocast is on."""
    device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
    if not torch.is_autocast_enabled(device):
        return function.apply(*args)
    rule = policy.get(device)
    if rule is not None:
        dtype = torch.get_autocast_dtype(device) if rule == "lower" else torch.float32
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with torch.autocast(device, enabled=False):
        return function.apply(*args)
