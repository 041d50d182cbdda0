"""How far a custom tensor is from its native counterpart: ``assert_close``'s test, with the numbers.

``diffs`` compares many pairs at once (shadow mode compares ~20 small tensors a step).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

# torch.testing.assert_close's defaults (rtol, atol) per dtype
DEFAULT_TOLERANCE = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5),
                     torch.float32: (1.3e-6, 1e-5), torch.float64: (1e-7, 1e-7)}


@dataclass
class TensorDiff:
    """How far a custom tensor is from its native counterpart."""

    name: str
    kind: str                 # loss | output | param_grad | buffer | layer_output | input_grad
    ok: bool
    max_abs_diff: float
    max_rel_diff: float
    rel_l2: float             # ||c - n|| / ||n||
    cosine: float
    norm_ratio: float         # ||c|| / ||n||
    score: float              # max |c - n| / (atol + rtol |n|): <= 1 passes, like assert_close
    vacuous: bool             # both norms below atol: "passes" without meaning much
    dtype: str
    rtol: float
    atol: float
    layer: str = ""           # the module it belongs to: registry name, or class (``Linear``)
    where: str = ""           # for a mismatch: how many elements differ, the worst, the inputs there
    cause: str = ""           # after bisect: ``culprit``, ``consequence of <path>`` or ``independent``


def size(d: TensorDiff) -> str:
    """The size of an error in numbers: ``relative L2 0.025, cosine 0.999680, score 146``."""
    return f"relative L2 {d.rel_l2:.3g}, cosine {d.cosine:.6f}, score {d.score:.3g}"


def diff(name: str, kind: str, custom: torch.Tensor, native: torch.Tensor,
         rtol: float | None = None, atol: float | None = None) -> TensorDiff:
    """Compare one pair of tensors as ``assert_close(custom, native, equal_nan=True)`` would, with the numbers."""
    return diffs([(name, kind, custom, native)], rtol, atol)[0]


def diffs(pairs: Iterable[tuple[str, str, torch.Tensor, torch.Tensor]], rtol: float | None = None,
          atol: float | None = None) -> list[TensorDiff]:
    """``diff`` of each ``(name, kind, custom, native)``, computed together: elementwise work once over
    the concatenated tensors, two reductions per tensor, one sync per ~2^20 elements.

    (Shadow mode compares ~20 small tensors per step; one by one, op dispatch dominates.)
    """
    pairs = list(pairs)
    out: list[TensorDiff | None] = [None] * len(pairs)
    groups: dict[torch.dtype, list[tuple]] = {torch.float32: [], torch.float64: []}  # by the dtype worked in
    numel = dict.fromkeys(groups, 0)  # elements in each group so far
    for i, (name, kind, c, n) in enumerate(pairs):
        default = DEFAULT_TOLERANCE.get(n.dtype, DEFAULT_TOLERANCE[torch.float32])
        r, a = default[0] if rtol is None else rtol, default[1] if atol is None else atol
        dtype = str(n.dtype).removeprefix("torch.")
        if c.shape != n.shape:
            out[i] = TensorDiff(name, kind, False, math.inf, math.inf, math.inf, 0.0, math.nan, math.inf, False,
                                dtype, r, a)
        elif n.numel() == 0:
            out[i] = TensorDiff(name, kind, True, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, True, dtype, r, a)
        else:
            work = torch.float64 if torch.float64 in (c.dtype, n.dtype) else torch.float32
            group = groups[work]
            if group and numel[work] + n.numel() > _GROUP_NUMEL:
                _diff_group(group, out, work)
                group.clear()
                numel[work] = 0
            group.append((i, c, n, TensorDiff(name, kind, False, 0, 0, 0, 0, 0, 0, False, dtype, r, a)))
            numel[work] += n.numel()
    for work, group in groups.items():
        if group:
            _diff_group(group, out, work)
    return out


_GROUP_NUMEL = 1 << 20  # elements diffed together: bounds the temporaries (~10 of them)


def _diff_group(group: list[tuple], out: list, work: torch.dtype) -> None:
    """Fill ``out[i]`` for each ``(i, custom, native, template)`` of the group; ``template`` holds name, tolerances.

    Computed in ``work``: float64 for float64 pairs, else float32 (exact for the difference of two
    float32 values within a factor of 2, and half the memory traffic).
    """
    seg = [n.numel() for _, _, n, _ in group]
    c = torch.cat([c.detach().reshape(-1) for _, c, _, _ in group]).to(work)
    n = torch.cat([n.detach().reshape(-1) for _, _, n, _ in group]).to(work)
    tols = {(t.rtol, t.atol) for *_, t in group}
    if len(tols) == 1:
        r, a = tols.pop()
    else:  # per element, from each tensor's dtype
        r, a = torch.tensor([(t.rtol, t.atol) for *_, t in group], dtype=work, device=c.device
                            ).repeat_interleave(torch.tensor(seg, device=c.device), dim=0).unbind(1)
    inf = math.inf
    d = (c - n).abs_()
    na = n.abs()
    if math.isfinite(d.sum()):  # so c and n are finite (NaN and inf propagate): only 0/0 below gives NaN
        score = d / (na * r + a)
        rel = (d / na).nan_to_num_(nan=0.0, posinf=inf)
    else:  # equal infinities and NaN on both sides differ by 0; NaN on one side only by inf
        d = torch.where((c == n) | (c.isnan() & n.isnan()), 0.0, d).nan_to_num_(nan=inf, posinf=inf)
        c, n, na = c.nan_to_num(nan=0.0, posinf=inf, neginf=-inf), n.nan_to_num(nan=0.0, posinf=inf, neginf=-inf), \
            na.nan_to_num(nan=0.0, posinf=inf)
        score = (d / (na * r + a)).nan_to_num_(nan=inf, posinf=inf)
        rel = torch.where(d == 0, 0.0, d / na).nan_to_num_(nan=inf, posinf=inf)
    # per tensor, views of one stacked buffer: the Gram matrix of (c, n, d) gives c.c, n.n, c.n and d.d
    rows = torch.stack([c, n, d, score, rel])
    maxes = torch.stack([x.amax(1) for x in rows[2:].split(seg, 1)])
    sums = torch.stack([x @ x.T for x in rows[:3].split(seg, 1)])
    if work != torch.float64 and not bool(sums.isfinite().all()):  # a float32 square overflowed: in float64
        sums = torch.stack([x @ x.T for x in rows[:3].double().split(seg, 1)])
    for (i, *_, t), (max_abs, score, max_rel), gram in zip(group, maxes.tolist(), sums.tolist()):
        (cc, cn, _), (_, nn2, _), (_, _, dd) = gram
        nc, nn_, dn = math.sqrt(cc), math.sqrt(nn2), math.sqrt(dd)
        out[i] = replace(
            t, ok=score <= 1.0, max_abs_diff=max_abs, max_rel_diff=max_rel,
            rel_l2=dn / nn_ if nn_ > 0 else (math.inf if nc > 0 else 0.0),
            cosine=cn / (nc * nn_) if nc > 0 and nn_ > 0 else float(nc == nn_),
            norm_ratio=nc / nn_ if nn_ > 0 else (1.0 if nc == 0 else math.inf), score=score,
            vacuous=nc <= t.atol and nn_ <= t.atol)
