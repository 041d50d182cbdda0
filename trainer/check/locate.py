"""Where a mismatch is: which elements of a tensor differ, what the layer's input held there, and who raised.

The comparison's numbers (``trainer.check.diff.TensorDiff``) say how far apart two tensors
are; this module says where: how many elements are outside tolerance, the worst one's
index and values, and, for a layer's input grad, what the input held at the differing
elements (a ReLU twin wrong only at its kink shows "all 37 have input exactly 0").
It also turns an exception raised by a twin into one line naming its Function.
"""
from __future__ import annotations

import math
import re
import traceback
from collections.abc import Sequence

import torch


def _index(flat: int, shapes: Sequence[torch.Size]) -> str:
    """``[3, 5]``, or ``call 2 [3, 5]`` when the tensor is several calls' results laid end to end."""
    for call, shape in enumerate(shapes, start=1):
        size = math.prod(shape)
        if flat < size:
            idx = list(torch.unravel_index(torch.tensor(flat), tuple(shape))) if len(shape) else []
            text = "[" + ", ".join(str(int(i)) for i in idx) + "]"
            return f"call {call} {text}" if len(shapes) > 1 else text
        flat -= size
    return f"[{flat}]"


def _inputs_share(x: torch.Tensor) -> str:
    """What the input values at the differing elements have in common, or their range."""
    n = x.numel()
    every = "the" if n == 1 else f"all {n}"
    if n == 0:
        return ""
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        return f"{every} differing elements have input exactly {lo:.6g}"
    if hi < 0:
        return f"{every} differing elements have negative input ({lo:.3g} to {hi:.3g})"
    if lo > 0:
        return f"{every} differing elements have positive input ({lo:.3g} to {hi:.3g})"
    if lo == 0 or hi == 0:
        return f"{every} differing elements have input {'>= 0' if lo == 0 else '<= 0'} ({lo:.3g} to {hi:.3g})"
    return ""  # nothing in common: the values alone would be noise


def where(custom: torch.Tensor, native: torch.Tensor, rtol: float, atol: float,
          shapes: Sequence[torch.Size] | None = None, inputs: torch.Tensor | None = None) -> str:
    """Where two flat tensors differ, in words.

    Args:
        custom, native: the compared tensors, flattened (several calls' tensors end to end).
        rtol, atol: the tolerance the comparison used; an element differs when
            ``|c - n| > atol + rtol |n|`` (or one side only is NaN).
        shapes: each call's shape, to give the worst element's index in it.
        inputs: for a layer's input grad, the layer's input values, flattened the same way.

    Returns:
        e.g. ``37 of 256 elements differ, worst at [3, 5] (custom 0.5, native 1); all 37
        differing elements have input exactly 0``.
    """
    if custom.shape != native.shape:
        return f"{custom.numel()} elements against native's {native.numel()}"
    c, n = custom.detach().double().flatten(), native.detach().double().flatten()
    if c.numel() == 0:
        return "no elements"
    d = (c - n).abs()
    both_nan = c.isnan() & n.isnan()
    same = (c == n) | both_nan
    score = torch.where(same, 0.0, (d / (atol + rtol * n.abs())).nan_to_num(nan=math.inf, posinf=math.inf))
    bad = score > 1
    count = int(bad.sum())
    worst = int(score.argmax())
    shapes = shapes or [native.shape]
    at = f"worst at {_index(worst, shapes)}" if c.numel() > 1 else "the only element"
    text = (f"{count} of {c.numel()} elements differ, {at} "
            f"(custom {float(c[worst]):.6g}, native {float(n[worst]):.6g})")
    if inputs is not None and inputs.numel() == c.numel() and count:
        shared = _inputs_share(inputs.detach().double().flatten()[bad])
        text += f"; {shared}" if shared else ""
    return text


_OURS = __file__.rsplit("/", 1)[0]  # the trainer package: its loop and comparison are no twin's place


def _users(filename: str) -> bool:
    """A frame in code a twin's author wrote (the built-in twins count; torch and our loop do not)."""
    if "site-packages" in filename or "/torch/" in filename or filename.startswith("<"):
        return False
    return not filename.startswith(_OURS) or filename.startswith(f"{_OURS}/twins/")


def raised(exc: BaseException) -> tuple[str, str]:
    """``(function, message)`` for an exception a twin raised: the autograd Function whose
    backward (or forward) raised, if one can be told, and the exception in one line
    with the place in user code it came from."""
    function = ""
    place = ""
    for frame, line in traceback.walk_tb(exc.__traceback__):
        ctx = frame.f_locals.get("ctx")
        cls = getattr(type(ctx), "_forward_cls", None)
        if cls is not None and frame.f_code.co_name == "backward":
            function = f"{cls.__name__}.backward"
        if _users(frame.f_code.co_filename):
            place = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{line}"  # the innermost user frame
    first = (str(exc).strip().splitlines() or [""])[0]
    if not function and (m := re.search(r"Function (\w+?)Backward\w*", first)):  # checked by the engine
        function = f"{m.group(1)}.backward"
    return function, f"{type(exc).__name__}: {first}" + (f" (at {place})" if place else "")
