"""Autocast for twins: cast inputs as autocast would for the native op, then run the Function with autocast off.

Autocast casts op by op inside a Function's forward but not in its backward, so a twin
whose forward ran under autocast would see mixed dtypes in backward (custom-functions.md
section 5). Instead the twin's module casts its inputs once, the way autocast treats the
native op on that device (the policy), and the Function runs with autocast off in both
directions: the same contract as ``torch.amp.custom_fwd(cast_inputs=...)``, which cannot
be combined with ``setup_context`` (pytorch#132388).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

# Policies, by device type: "lower" runs in the autocast dtype (linear, conv), "fp32" in
# float32 (losses; on CUDA also norms and softmax), absent means the input dtype is kept.
LOWER = {"cpu": "lower", "cuda": "lower"}
FP32 = {"cpu": "fp32", "cuda": "fp32"}
FP32_ON_CUDA = {"cuda": "fp32"}
KEEP: Mapping[str, str] = {}


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
