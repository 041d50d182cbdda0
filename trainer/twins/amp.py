"""How a twin calls its Function (autocast as native would see it), and half types computed in float32.

Autocast casts op by op inside a Function's forward but not in its backward, so a twin
whose forward ran under autocast would see mixed dtypes in backward (custom-functions.md
section 5). Instead the twin's module casts its inputs once, the way autocast treats the
native op on that device (the policy), and the Function runs with autocast off in both
directions: the same contract as ``torch.amp.custom_fwd(cast_inputs=...)``, which cannot
be combined with ``setup_context`` (pytorch#132388).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

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

def in_float32(fn: Callable) -> Callable:
    """``fn`` computed in float32 when a tensor argument is half or bfloat16, its result rounded once
    to that dtype, as native kernels compute ("opmath"); in any other dtype ``fn`` runs as it is.

    Wraps a twin's forward formula or derivative: ``fn(*args)`` returns one tensor.
    """
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
