"""Check cases of the built-in twins, one list per layer: the inputs of ``trainer gradcheck``, tests/test_layers.py
and device_check. Inputs are float64 builders ``make(generator) -> tuple of tensors``; the checks cast them."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn


@dataclass(frozen=True)
class Case:
    """One input configuration on which a twin is checked against its native layer.

    Attributes:
        id: short label, e.g. ``"gelu-tanh"``.
        module: builds the *native* module (the checks cast it and swap a copy).
        inputs: builds the forward arguments in float64 from a generator (floating ones are cast and get grads).
        gradcheck: False for cases compared with native only (kinks, limits, large inputs).
        train: run the module in train (True) or eval (False) mode.
        edges: edge values (inf, NaN, kinks); where native's vectorized and scalar CPU loops differ, either passes.
    """

    id: str
    module: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple[torch.Tensor, ...]]
    gradcheck: bool = True
    train: bool = True
    edges: bool = False


def randn(*shape: int, scale: float = 1.0, shift: float = 0.0, kinks: tuple[float, ...] = (0.0,), gap: float = 0.05):
    """``shift + scale * z``, z standard-normal float64 samples, each at least ``gap`` away from every kink."""
    def make(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        x = shift + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
        for k in kinks:
            x = torch.where((x - k).abs() < gap, torch.where(x < k, k - gap, k + gap), x)
        return (x,)
    return make


def fixed(*tensors):
    """Fixed float64 inputs holding exactly these values (numbers, or rows of numbers)."""
    return lambda gen: tuple(torch.tensor(v, dtype=torch.float64) for v in tensors)


def edges(id: str, module, *vals: float) -> Case:
    """An edge-value case: no gradcheck (kinks, limits); compared with native element by element."""
    return Case(id, module, fixed(vals), gradcheck=False, edges=True)


EDGES = (-math.inf, -1e30, -100.0, -20.0, -3.0, -1.0, -1e-8, -0.0, 0.0, 1e-8, 1.0, 3.0, 20.0, 100.0, 1e30, math.inf,
         math.nan)
BELOW_3 = 3 - 2**-22  # the float32 just below 3
HARD_EDGES = (-math.inf, -1e30, -4.0, -3.0001, -3.0, -BELOW_3, -2.9999, -0.0, 0.0, 2.9999, BELOW_3, 3.0, 3.0001, 4.0,
              1e30, math.inf, math.nan)
GELU_EDGES = (-math.inf, -1e30, -1e4, -40.0, -10.0, -5.0, -1.0, -0.0, 0.0, 0.5, 5.0, 10.0, 40.0, 1e4, 1e30, math.inf,
              math.nan)

# --- activations ------------------------------------------------------------------------
relu = [Case("relu", nn.ReLU, randn(4, 7)), edges("relu-edges", nn.ReLU, *EDGES)]
leaky_relu = [Case("leaky-3d", nn.LeakyReLU, randn(2, 2, 3)),
              Case("leaky-slope-neg", lambda: nn.LeakyReLU(-0.3), randn(3, 4)),  # saves x
              Case("leaky-slope1.5", lambda: nn.LeakyReLU(1.5), randn(3, 4)),
              edges("leaky-edges", nn.LeakyReLU, *EDGES),
              edges("leaky-slope0-edges", lambda: nn.LeakyReLU(0.0), *EDGES),
              edges("leaky-slope-neg-edges", lambda: nn.LeakyReLU(-0.3), *EDGES)]
elu = [Case("elu-3d", nn.ELU, randn(2, 2, 3)),
       Case("elu-alpha-neg", lambda: nn.ELU(alpha=-0.5), randn(3, 4)),  # saves x
       Case("elu-alpha2", lambda: nn.ELU(alpha=2.0), randn(3, 4)),
       edges("elu-edges", nn.ELU, *EDGES),
       edges("elu-alpha2-edges", lambda: nn.ELU(alpha=2.0), *EDGES),
       edges("elu-alpha-neg-edges", lambda: nn.ELU(alpha=-0.5), *EDGES)]
gelu = [Case("gelu", nn.GELU, randn(3, 4, scale=2.0)),
        Case("gelu-tanh-3d", lambda: nn.GELU(approximate="tanh"), randn(2, 2, 3, scale=2.0)),
        edges("gelu-edges", nn.GELU, *GELU_EDGES),
        edges("gelu-tanh-edges", lambda: nn.GELU(approximate="tanh"), *GELU_EDGES)]
silu = [Case("silu-3d", nn.SiLU, randn(2, 2, 3, scale=3.0)), edges("silu-edges", nn.SiLU, *EDGES)]
mish = [Case("mish-3d", nn.Mish, randn(2, 2, 3, scale=3.0)),
        edges("mish-edges", nn.Mish, *EDGES, -1.19, 19.99, 20.01, 50.0, 88.0, 89.0)]
softplus = [Case("softplus", nn.Softplus, randn(3, 4, scale=3.0)),
            Case("softplus-beta2-thr5-3d", lambda: nn.Softplus(2.0, 5.0), randn(2, 2, 3, scale=3.0, kinks=(2.5,))),
            edges("softplus-edges", nn.Softplus, *EDGES, 19.99, 20.0, 20.01, 88.0, 89.0),
            edges("softplus-beta2-thr5-edges", lambda: nn.Softplus(2.0, 5.0), *EDGES, 2.4999, 2.5, 2.5001)]
sigmoid = [Case("sigmoid-3d", nn.Sigmoid, randn(2, 2, 3, scale=3.0)), edges("sigmoid-edges", nn.Sigmoid, *EDGES)]
tanh = [Case("tanh-3d", nn.Tanh, randn(2, 2, 3, scale=2.0)), edges("tanh-edges", nn.Tanh, *EDGES, 1e-4, -1e-4, 0.3)]
hardsigmoid = [Case("hardsigmoid-3d", nn.Hardsigmoid, randn(2, 2, 4, scale=3.0, kinks=(-3.0, 3.0))),
               edges("hardsigmoid-edges", nn.Hardsigmoid, *HARD_EDGES)]
hardswish = [Case("hardswish-3d", nn.Hardswish, randn(2, 2, 4, scale=3.0, kinks=(-3.0, 3.0))),
             edges("hardswish-edges", nn.Hardswish, *HARD_EDGES)]

# --- dense: the "wide" and "tuples" cases are large enough for fast-mode gradcheck ------
linear = [Case("linear-1d", lambda: nn.Linear(4, 3), randn(4)),
          Case("linear-3d", lambda: nn.Linear(3, 2), randn(2, 3, 3)),
          Case("linear-nobias", lambda: nn.Linear(4, 3, bias=False), randn(5, 4)),
          Case("linear-wide", lambda: nn.Linear(16, 8), randn(3, 2, 16))]
conv2d = [
    Case("conv2d-stride2", lambda: nn.Conv2d(1, 2, 2, stride=2), randn(1, 1, 5, 5)),  # last row/col unread
    Case("conv2d-same-dilation2", lambda: nn.Conv2d(1, 1, 3, padding="same", dilation=2), randn(1, 1, 4, 4)),
    Case("conv2d-same-even-kernel", lambda: nn.Conv2d(1, 1, (2, 3), padding="same"), randn(1, 1, 4, 5)),
    Case("conv2d-valid", lambda: nn.Conv2d(1, 2, 2, padding="valid"), randn(1, 1, 3, 3)),
    Case("conv2d-groups2", lambda: nn.Conv2d(4, 2, 1, groups=2), randn(1, 4, 2, 2)),
    Case("conv2d-depthwise", lambda: nn.Conv2d(2, 2, 2, padding=1, groups=2), randn(1, 2, 3, 3)),
    Case("conv2d-nobias", lambda: nn.Conv2d(1, 2, 2, bias=False), randn(2, 1, 3, 3)),
    Case("conv2d-reflect", lambda: nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), randn(1, 1, 3, 4)),
    Case("conv2d-circular", lambda: nn.Conv2d(1, 1, 3, padding=(1, 2), padding_mode="circular"), randn(1, 1, 4, 4)),
    Case("conv2d-unbatched", lambda: nn.Conv2d(1, 2, 2), randn(1, 4, 4)),
    Case("conv2d-tuples", lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
         randn(2, 4, 7, 6))]

# --- dropout, embedding -----------------------------------------------------------------
dropout = [Case("p0.3", lambda: nn.Dropout(0.3), randn(4, 7)),
           Case("p0", lambda: nn.Dropout(0.0), randn(4, 7)),
           Case("p1", lambda: nn.Dropout(1.0), randn(4, 7)),
           Case("eval", lambda: nn.Dropout(0.5), randn(4, 7), train=False),
           Case("p0.5-large", lambda: nn.Dropout(0.5), randn(8, 16, 33), gradcheck=False)]


def indices(*rows):
    """Fixed indices, so repeats and padding-row hits are chosen, not drawn."""
    return lambda gen: (torch.tensor(rows),)


def _emb(**kw):
    return lambda: nn.Embedding(5, 3, **kw)


# with a padding row that is read, native's grads are not the forward's derivative (that row's is 0): no gradcheck
embedding = [Case("embedding", _emb(), indices([0, 2, 2], [4, 1, 2])),
             Case("embedding-1d-indices", lambda: nn.Embedding(4, 2), indices(3, 3, 0)),
             Case("embedding-padding-unused", _emb(padding_idx=1), indices([0, 2, 2], [4, 3, 2])),
             Case("embedding-padding", _emb(padding_idx=1), indices([1, 2, 1], [4, 1, 2]), gradcheck=False),
             Case("embedding-padding-negative", _emb(padding_idx=-1), indices([4, 0, 4, 3]), gradcheck=False),
             Case("embedding-scale-grad-by-freq", _emb(padding_idx=0, scale_grad_by_freq=True),
                  indices([0, 2, 2], [4, 2, 0]), gradcheck=False),
             Case("embedding-max-norm", _emb(max_norm=1.0), indices([0, 2, 2], [4, 1, 2]), gradcheck=False)]


# --- norm: random affine parameters and running stats, so none is the trivial 1 or 0 ----
def _randomized(native, *args, **kw):
    def make() -> nn.Module:
        m = native(*args, **kw)
        bounds = {"weight": (0.5, 1.5), "bias": (-1.0, 1.0), "running_mean": (-1.0, 1.0), "running_var": (0.5, 2.0)}
        with torch.no_grad():
            for name, (low, high) in bounds.items():
                if getattr(m, name, None) is not None:
                    getattr(m, name).uniform_(low, high)
        return m
    return make


ln, bn1, bn2 = (partial(_randomized, native) for native in (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d))
layer_norm = [Case("last-dim", ln(5), randn(3, 5)),
              Case("last-two-dims", ln((3, 4)), randn(2, 3, 4)),
              Case("no-affine", ln(6, elementwise_affine=False), randn(4, 6)),
              Case("no-bias", ln(6, bias=False), randn(3, 6)),
              Case("shifted", ln(8), randn(2, 8, scale=0.5, shift=3.0)),
              Case("wide", ln(96), randn(2, 5, 96), gradcheck=False),
              Case("wide-no-affine", ln((4, 24), elementwise_affine=False), randn(3, 4, 24), gradcheck=False)]
batch_norm = [Case("1d-NC", bn1(3), randn(6, 3)),
              Case("1d-NCL", bn1(3), randn(3, 3, 4)),
              Case("2d", bn2(2), randn(2, 2, 3, 3)),
              Case("2d-eval", bn2(2), randn(2, 2, 3, 3), train=False),
              Case("2d-affine-false", bn2(2, affine=False), randn(3, 2, 2, 2)),
              Case("1d-momentum-none", bn1(3, momentum=None), randn(5, 3)),
              Case("2d-no-running-stats", bn2(2, track_running_stats=False), randn(2, 2, 3, 3)),
              Case("2d-no-running-stats-eval", bn2(2, track_running_stats=False), randn(2, 2, 3, 3), train=False),
              Case("1d-eval-affine-false", bn1(3, affine=False), randn(4, 3, 2), train=False),
              Case("2d-shifted", bn2(4), randn(4, 4, 5, 5, scale=0.5, shift=3.0), gradcheck=False),
              Case("2d-wide-affine-false", bn2(3, affine=False), randn(4, 3, 6, 6), gradcheck=False)]


# --- softmax ----------------------------------------------------------------------------
def _softmax(native: type[nn.Module], name: str) -> list[Case]:
    return [
        Case(f"{name}-dim1", lambda: native(dim=1), randn(4, 7)),
        Case(f"{name}-dim-1-3d", lambda: native(dim=-1), randn(2, 3, 5)),
        Case(f"{name}-dim-2-3d", lambda: native(dim=-2), randn(2, 5, 3)),
        Case(f"{name}-dimNone-3d", lambda: native(dim=None), randn(3, 2, 4)),  # native picks dim 0
        Case(f"{name}-1d", lambda: native(dim=0), randn(9)),
        Case(f"{name}-large", lambda: native(dim=1),
             fixed([[1000.0, 999.0, -1000.0, 0.0], [-500.0, -501.0, -499.0, -1e4]]), gradcheck=False),
        Case(f"{name}-wide-range", lambda: native(dim=-1), randn(3, 50, scale=30.0), gradcheck=False),
        Case(f"{name}-inf", lambda: native(dim=1), fixed([[-math.inf, 0.0, 1.0], [-math.inf, -math.inf, -math.inf]]),
             gradcheck=False),
        Case(f"{name}-empty", lambda: native(dim=1), randn(0, 4), gradcheck=False)]


softmax = _softmax(nn.Softmax, "softmax")
log_softmax = _softmax(nn.LogSoftmax, "log_softmax")


# --- losses -----------------------------------------------------------------------------
def pair(*shape: int, target=torch.randn, scale: float = 1.0, target_shape: tuple[int, ...] | None = None):
    """(input, float target) in float64; the target drawn by ``target`` (standard normal, or ``torch.rand``)."""
    def make(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
        return x, target(*(target_shape or shape), generator=gen, dtype=torch.float64)
    return make


def logits(*shape: int, ignore: int | None = None, probs: bool = False, scale: float = 1.0, target=None):
    """(logits, target): class indices drawn over C = shape[1] (shape[0] unbatched), every third set to ``ignore``;
    or, with ``probs``, class probabilities; or the given ``target``."""
    def make(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
        cdim = 1 if len(shape) > 1 else 0
        if target is not None:
            return x, torch.tensor(target)
        if probs:
            return x, torch.randn(*shape, generator=gen, dtype=torch.float64).softmax(cdim)
        t = torch.randint(shape[cdim], shape[:cdim] + shape[cdim + 1:], generator=gen)
        if ignore is not None:
            t.view(-1)[::3] = ignore
        return x, t
    return make


def _w(*w: float) -> torch.Tensor:
    return torch.tensor(w or (0.5, 2.0, 1.0, 0.25, 3.0), dtype=torch.float64)  # five class weights by default


mse = [Case("mse-mean", nn.MSELoss, pair(4, 5)),
       Case("mse-sum", lambda: nn.MSELoss(reduction="sum"), pair(4, 5)),
       Case("mse-none", lambda: nn.MSELoss(reduction="none"), pair(2, 3, 4)),
       Case("mse-broadcast-target", nn.MSELoss, pair(4, 5, target_shape=(4, 1))),
       Case("mse-scalar", nn.MSELoss, fixed(1.5, -0.25))]
l1 = [Case("l1-mean", nn.L1Loss, pair(4, 5)),
      Case("l1-sum", lambda: nn.L1Loss(reduction="sum"), pair(4, 5)),
      Case("l1-none", lambda: nn.L1Loss(reduction="none"), pair(2, 3, 4)),
      Case("l1-x-equals-t", nn.L1Loss, fixed([1.0, -2.0, 0.5, 0.0], [1.0, -2.0, 0.25, 0.0]), gradcheck=False)]
huber = [Case("huber-mean", nn.HuberLoss, pair(4, 5, scale=2.0)),
         Case("huber-sum-delta0.5", lambda: nn.HuberLoss(reduction="sum", delta=0.5), pair(4, 5)),
         Case("huber-none-delta2", lambda: nn.HuberLoss(reduction="none", delta=2.0), pair(2, 3, 4, scale=3.0)),
         Case("huber-at-delta", lambda: nn.HuberLoss(delta=0.5),
              fixed([1.0, -1.0, 0.75, 0.0, 2.0], [0.5, -0.5, 0.25, 0.5, 0.0]), gradcheck=False)]
ce = nn.CrossEntropyLoss
cross_entropy = [
    Case("ce-mean", ce, logits(6, 5)),
    Case("ce-sum", lambda: ce(reduction="sum"), logits(6, 5)),
    Case("ce-none", lambda: ce(reduction="none"), logits(6, 5)),
    Case("ce-weight", lambda: ce(weight=_w()), logits(6, 5)),
    Case("ce-ignore", ce, logits(6, 5, ignore=-100)),
    Case("ce-ignore-class2-weight-sum", lambda: ce(weight=_w(), ignore_index=2, reduction="sum"),
         logits(6, 5, ignore=2)),
    Case("ce-smoothing", lambda: ce(label_smoothing=0.2), logits(6, 5)),
    Case("ce-smoothing-weight-ignore", lambda: ce(weight=_w(), label_smoothing=0.1), logits(6, 5, ignore=-100)),
    Case("ce-smoothing-weight-ignore-none", lambda: ce(weight=_w(), label_smoothing=0.1, reduction="none"),
         logits(6, 5, ignore=-100)),
    Case("ce-NCd", lambda: ce(ignore_index=1), logits(2, 4, 5, ignore=1)),
    Case("ce-NCdd-weight-smoothing", lambda: ce(weight=_w(1.0, 0.5, 2.0), label_smoothing=0.3), logits(2, 3, 2, 3)),
    Case("ce-unbatched", ce, logits(7)),
    Case("ce-probs", ce, logits(4, 5, probs=True)),
    Case("ce-probs-weight-smoothing-sum", lambda: ce(weight=_w(), label_smoothing=0.2, reduction="sum"),
         logits(4, 5, probs=True)),
    Case("ce-probs-NCd-none", lambda: ce(reduction="none"), logits(2, 3, 4, probs=True)),
    Case("ce-all-ignored", ce, logits(4, 5, target=[-100] * 4), gradcheck=False),
    Case("ce-all-ignored-weight-smoothing", lambda: ce(weight=_w(), label_smoothing=0.1),
         logits(4, 5, target=[-100] * 4), gradcheck=False),
    Case("ce-zero-weight-rows", lambda: ce(weight=_w(0.0, 0.0, 1.0)), logits(3, 3, target=[0, 1, 0]), gradcheck=False),
    Case("ce-large-logits-smoothing", lambda: ce(label_smoothing=0.1), logits(8, 6, scale=300.0), gradcheck=False),
    Case("ce-empty-batch", ce, logits(0, 5), gradcheck=False)]
bce = nn.BCEWithLogitsLoss
EXTREME = fixed([100.0, -100.0, 100.0, -100.0, 40.0, -40.0], [1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
bce_with_logits = [
    Case("bce-mean", bce, pair(4, 5, target=torch.rand)),
    Case("bce-sum", lambda: bce(reduction="sum"), pair(4, 5, target=torch.rand)),
    Case("bce-none", lambda: bce(reduction="none"), pair(2, 3, 4, target=torch.rand)),
    Case("bce-weight", lambda: bce(weight=_w()), pair(4, 5, target=torch.rand)),
    Case("bce-pos-weight", lambda: bce(pos_weight=_w()), pair(4, 5, target=torch.rand, scale=3.0)),
    Case("bce-weight-pos-weight-none", lambda: bce(weight=_w(2.0, 0.5, 1.5, 1.0), pos_weight=_w(3.0, 1.0, 0.5, 2.0),
                                                   reduction="none"), pair(2, 2, 4, target=torch.rand)),
    Case("bce-extreme-logits", bce, EXTREME, gradcheck=False),
    Case("bce-extreme-logits-pos-weight", lambda: bce(pos_weight=_w(3.0), reduction="sum"), EXTREME, gradcheck=False)]
