"""Native against custom on the same weights and data: every gradient compared, and bisect to the guilty layer."""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from trainer import layers
from trainer.checkpoint import reseed
from trainer.locate import raised, where

# torch.testing.assert_close's defaults (rtol, atol) per dtype
DEFAULT_TOLERANCE = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5),
                     torch.float32: (1.3e-6, 1e-5), torch.float64: (1e-7, 1e-7)}
LOSS = "loss"  # the module path under which the loss module is reported


@dataclass
class TensorDiff:
    """How far a custom tensor is from its native counterpart."""

    name: str
    kind: str                 # loss | output | param_grad | layer_output | input_grad
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


@dataclass
class Capture:
    """What one model produced on the batches: loss, output, grads, and per watched layer its output and dx."""

    losses: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    param_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    input_grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    saved_bytes: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per watched layer, per call
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)       # after the last batch
    owners: dict[str, str] = field(default_factory=dict)  # parameter/buffer name -> its module's layer name


def layer_name(module) -> str:
    """The registry name of a layer (``batch_norm``), else its class name (``Linear``)."""
    info = layers.impl_of(module) if isinstance(module, nn.Module) else None
    return info[0] if info else type(module).__name__


def owners(model: nn.Module, loss_fn=None) -> dict[str, str]:
    """``{parameter or buffer name: layer name of the module holding it}`` (the loss's under ``loss.``)."""
    out = {}
    for root, prefix in ((model, ""), (loss_fn, f"{LOSS}.")):
        if isinstance(root, nn.Module):
            for path, m in root.named_modules():
                for name, _ in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)):
                    out[prefix + (f"{path}.{name}" if path else name)] = layer_name(m)
    return out


def swapped_layers(model: nn.Module, loss_fn: nn.Module | None = None) -> dict[str, str]:
    """``{module path: layer name}`` of every registry layer running its custom twin (the loss as ``loss``)."""
    found = {path: info[0] for path, m in model.named_modules() if (info := layers.impl_of(m)) and info[1] == "custom"}
    if isinstance(loss_fn, nn.Module) and (info := layers.impl_of(loss_fn)) and info[1] == "custom":
        found[LOSS] = info[0]
    return found


class OutputMismatch(RuntimeError):
    """A twin's output has another shape or dtype than its native layer's on the same input."""


def run(model: nn.Module, loss_fn, batches: Iterable, watch: Iterable[str], seed: int = 0,
        autocast=None, expect: Capture | None = None) -> Capture:
    """Forward and backward every batch (grads accumulate), recording what ``watch``'s layers saw and produced.

    With ``expect`` (the native run), a watched layer whose output's shape or dtype differs
    from native's raises ``OutputMismatch`` at once, before the next layer fails on it.
    """
    cap = Capture()
    modules = {p: (loss_fn if p == LOSS else model.get_submodule(p)) for p in watch}
    stack: list[str] = []
    storages: dict[str, dict[int, int]] = {p: {} for p in modules}
    inputs: dict[str, list[torch.Tensor]] = {}  # every call's input: a module may run several times

    def pre(path):
        def hook(module, args):
            stack.append(path)
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is not None and x.requires_grad:
                x.retain_grad()
                inputs.setdefault(path, []).append(x)
                cap.inputs.setdefault(path, []).append(x.detach().clone())
        return hook

    def post(path):
        def hook(module, args, out):
            stack.pop()
            done = cap.layer_outputs.setdefault(path, [])
            want = expect.layer_outputs.get(path, []) if expect is not None else []
            if isinstance(out, torch.Tensor) and len(done) < len(want) and \
                    (out.shape != want[len(done)].shape or out.dtype != want[len(done)].dtype):
                ref = want[len(done)]
                raise OutputMismatch(f"its output is {str(out.dtype).removeprefix('torch.')} {list(out.shape)}, "
                                     f"native's {str(ref.dtype).removeprefix('torch.')} {list(ref.shape)}")
            done.append(out.detach().clone())
        return hook

    kept = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(t: torch.Tensor) -> torch.Tensor:  # parameters live anyway: count what the graph alone keeps
        if stack and t.untyped_storage().data_ptr() not in kept:
            storages[stack[-1]][t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    handles = [h for p, m in modules.items()
               for h in (m.register_forward_pre_hook(pre(p)), m.register_forward_hook(post(p)))]
    model.zero_grad(set_to_none=True)
    try:
        for i, (x, y) in enumerate(batches):
            if x.is_floating_point():
                x = x.detach().clone().requires_grad_()  # so the first layer's input grad is compared too
            inputs.clear()
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                reseed(x.device, seed + i)  # the same dropout masks in both models
                with autocast or torch.autocast(x.device.type, enabled=False):
                    out = model(x)
                    loss = loss_fn(out, y)
            loss.backward()
            cap.losses.append(loss.detach().reshape(1))
            cap.outputs.append(out.detach())
            for path, ts in inputs.items():
                cap.input_grads.setdefault(path, []).extend(t.grad.detach().clone() if t.grad is not None
                                                            else torch.zeros_like(t) for t in ts)
    finally:
        for h in handles:
            h.remove()
    cap.param_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    cap.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    if isinstance(loss_fn, nn.Module):
        cap.buffers.update({f"{LOSS}.{n}": b.detach().clone() for n, b in loss_fn.named_buffers()})
    cap.owners = owners(model, loss_fn)
    cap.saved_bytes = {p: sum(s.values()) for p, s in storages.items()}
    return cap


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ts]) if ts else torch.zeros(0)


def diff_captures(custom: Capture, native: Capture, names: Mapping[str, str], rtol: float | None = None,
                  atol: float | None = None) -> list[TensorDiff]:
    """Every pair of tensors: loss, output, each param grad and buffer, and each watched layer's output and
    input grad (every call's, end to end); each mismatch says where it is (``TensorDiff.where``)."""
    loss_name = names.get(LOSS, "")
    pairs = [("loss", "loss", custom.losses, native.losses, loss_name),
             ("output", "output", custom.outputs, native.outputs, "")]
    for name in sorted(native.param_grads.keys() | custom.param_grads.keys()):
        c, n = custom.param_grads.get(name), native.param_grads.get(name)
        missing = torch.full_like(n if c is None else c, math.nan)  # one side has no grad: never equal
        pairs.append((name, "param_grad", [missing if c is None else c], [missing if n is None else n],
                      native.owners.get(name, "")))
    for name in sorted(native.buffers.keys() & custom.buffers.keys()):
        pairs.append((name, "buffer", [custom.buffers[name]], [native.buffers[name]], native.owners.get(name, "")))
    inputs = {}
    for path, layer in names.items():  # a module run several times a batch: each call on its own
        for kind, got, want in (("layer_output", custom.layer_outputs, native.layer_outputs),
                                ("input_grad", custom.input_grads, native.input_grads)):
            if path in want:
                calls = _calls(path, native)  # per batch; a batch's calls are recorded in order
                for k in range(calls):
                    name = f"{path} (call {k + 1})" if calls > 1 else path
                    pairs.append((name, kind, got.get(path, [])[k::calls], want[path][k::calls], layer))
                    if kind == "input_grad":
                        inputs[name] = native.inputs.get(path, [])[k::calls]
    out = diffs([(name, kind, _flat(c), _flat(n)) for name, kind, c, n, _ in pairs], rtol, atol)
    for d, (_, kind, c, n, layer) in zip(out, pairs):
        d.layer = layer
        if not d.ok:
            x = _flat(inputs.get(d.name, [])) if kind == "input_grad" else None
            d.where = where(_flat(c), _flat(n), d.rtol, d.atol, [t.shape for t in n], x)
    return sorted(out, key=lambda d: (d.ok, -d.score if not math.isnan(d.score) else math.inf))


def _calls(path: str, cap: Capture) -> int:
    """How many times the module at ``path`` ran per batch."""
    return max(1, len(cap.layer_outputs.get(path, [])) // max(1, len(cap.losses)))


def base_path(name: str) -> str:
    """``act`` for ``act (call 2)``: the module a compared tensor belongs to."""
    return name.split(" (call ", 1)[0]


def _call(name: str) -> int:
    return int(name.rsplit(" (call ", 1)[1][:-1]) if " (call " in name else 0


def swap_only(model: nn.Module, loss_fn, paths: Iterable[str], impl: str = "custom") -> None:
    """Switch just the module instances at ``paths`` (``loss`` for the loss module)."""
    for path in paths:
        module = loss_fn if path == LOSS else model.get_submodule(path)
        _, native, custom = layers.pair_of(module)
        module.__class__ = custom if impl == "custom" else native


def size(d: TensorDiff) -> str:
    """The size of an error in numbers: ``relative L2 0.025, cosine 0.999680, score 146``."""
    return f"relative L2 {d.rel_l2:.3g}, cosine {d.cosine:.6f}, score {d.score:.3g}"


def describe(d: TensorDiff) -> str:
    """What differs, its size, and where: ``input grad ×2 native (relative L2 1, cosine 1.000000, score 4e+05;
    12 of 256 elements differ, worst at [3, 5] (custom 6, native 3))``."""
    what = {"layer_output": "output", "input_grad": "input grad", "param_grad": f"param grad {d.name}",
            "buffer": f"buffer {d.name}", "loss": "loss", "output": "model output"}[d.kind]
    if math.isnan(d.norm_ratio):
        head = f"{what} has the wrong shape"
    elif d.kind in ("layer_output", "loss", "output", "buffer"):
        head = f"{what} differs by up to {d.max_abs_diff:.3g}"
    elif d.cosine > 0.999 and abs(d.norm_ratio - 1) >= 0.5 * d.rel_l2 and f"{d.norm_ratio:.3g}" != "1":
        # a scale error: the ratio says it all
        head = f"{what} ×{d.norm_ratio:.3g} native"
    elif d.cosine < -0.999 and abs(d.norm_ratio - 1) >= 0.5 * abs(d.rel_l2 - 2):
        head = f"{what} has the wrong sign (×{-d.norm_ratio:.3g} native)"
    elif d.cosine > 0.999:  # a small angle: the norm ratio would read as "×1"
        head = f"{what} is slightly off"
    else:
        head = f"{what} points elsewhere (norm ×{d.norm_ratio:.3g} native)"
    return f"{head} ({size(d)}" + (f"; {d.where})" if d.where else ")")


@dataclass
class Culprit:
    """A layer whose twin alone reproduces a mismatch (or raised)."""

    path: str           # module path, or "loss"
    layer: str          # registry name
    what: str           # what differs, in words, with its size
    error: str = ""     # the twin raised: its Function and the exception

    def __str__(self) -> str:
        return f"layer {self.path} ({self.layer}): {self.what}"


@dataclass
class Report:
    ok: bool
    tensors: list[TensorDiff]
    culprits: list[Culprit] = field(default_factory=list)
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # path -> {"layer", "native", "custom"}
    layers: dict[str, str] = field(default_factory=dict)  # every compared layer: path -> registry name
    error: str = ""     # a twin raised: the one line the CLI prints

    def to_dict(self) -> dict:
        culprits = {c.path: c for c in self.culprits}
        return {"ok": self.ok, "error": self.error or None, "tensors": [asdict(t) for t in self.tensors],
                "culprits": [asdict(c) | {"message": str(c)} for c in self.culprits],
                "layers": {p: {"layer": n, "ok": p not in culprits,
                               "error": culprits[p].error or None if p in culprits else None}
                           for p, n in self.layers.items()},
                "memory": self.memory}


class Comparison:
    """A model and loss built once from a config, compared native against custom on the same batches.

    Args:
        model, loss_fn: the model and loss, in any mix of implementations (copied, never changed).
        batches: ``(input, target)`` pairs fed to both.
        mapping: which layers run custom on the custom side (the config's ``layers:``); when
            it swaps nothing, every registry layer runs custom.
    """

    def __init__(self, model: nn.Module, loss_fn, batches: list, mapping: Mapping[str, str] | None = None, *,
                 rtol: float | None = None, atol: float | None = None, seed: int = 0, autocast=None):
        self.base = copy.deepcopy(model), copy.deepcopy(loss_fn)
        for m in self.base:
            if isinstance(m, nn.Module):
                layers.swap(m, {"default": "native"})
        self.batches, self.rtol, self.atol, self.seed, self.autocast = batches, rtol, atol, seed, autocast
        custom = self.variant(mapping or {"default": "custom"})
        self.swapped = swapped_layers(*custom)
        if not self.swapped:
            custom = self.variant({"default": "custom"})
            self.swapped = swapped_layers(*custom)
        # on a copy: a run changes buffers (batch-norm statistics), and every variant starts from the base's
        self.native = run(*self.variant(), batches, self.swapped, seed, autocast)

    def variant(self, mapping: Mapping[str, str] | None = None, only: Iterable[str] = ()):
        """A fresh copy of the native model and loss with ``mapping`` (or just the instances ``only``) swapped."""
        model, loss_fn = copy.deepcopy(self.base[0]), copy.deepcopy(self.base[1])
        if mapping is not None:
            for m in (model, loss_fn):
                if isinstance(m, nn.Module):
                    layers.swap(m, mapping)
        swap_only(model, loss_fn, only)
        return model, loss_fn

    def check(self, model: nn.Module, loss_fn) -> tuple[list[TensorDiff], Capture]:
        cap = run(model, loss_fn, self.batches, self.swapped, self.seed, self.autocast, self.native)
        return diff_captures(cap, self.native, self.swapped, self.rtol, self.atol), cap

    def report(self, bisect: bool = True) -> Report:
        """Everything swapped against native; on a mismatch, ``bisect`` names the culprits and tells
        root causes from their consequences. A twin that raises is named by trying each alone."""
        try:
            diffs, cap = self.check(*self.variant(only=self.swapped))
        except Exception as e:  # noqa: BLE001  (any exception a user's twin raises is reported, not re-raised)
            return self.raised(e)
        memory = {p: {"layer": n, "native": self.native.saved_bytes.get(p, 0), "custom": cap.saved_bytes.get(p, 0)}
                  for p, n in self.swapped.items()}
        ok = all(d.ok for d in diffs)
        culprits = [] if ok or not bisect else self.bisect(diffs)
        return Report(ok, diffs, culprits, memory, dict(self.swapped))

    def raised(self, exc: Exception) -> Report:
        """The report when the swapped model raised: the layer whose twin raises alone, its Function, the error."""
        culprits = []
        for path, name in self.swapped.items():
            try:
                self.check(*self.variant(only=[path]))
            except Exception as e:  # noqa: BLE001
                function, message = raised(e)
                error = f"{function} raised {message}" if function else f"raised {message}"
                culprits.append(Culprit(path, name, error, error))
        if not culprits:  # raised only with several twins at once
            function, message = raised(exc)
            return Report(False, [], [], {}, dict(self.swapped),
                          f"the swapped model raised, but no layer alone does: {function} {message}".replace("  ", " "))
        c = culprits[0]
        return Report(False, [], culprits, {}, dict(self.swapped), f"layer {c.path} ({c.layer}): {c.error}")

    def bisect(self, flagged: list[TensorDiff] = ()) -> list[Culprit]:
        """Swap one registry layer at a time, then one instance of each guilty layer, to name the culprits.

        Each culprit is described by its own tensors (output, input grad, its parameters' grads and
        buffers), with every call of a module run several times compared. Each tensor of ``flagged``
        that is not ok gets a ``cause``: ``culprit`` (a culprit's own), ``consequence of <path>`` (it
        differs with only that culprit swapped), or ``independent`` (no single culprit explains it).
        """
        culprits, consequences = [], {}
        for name in dict.fromkeys(self.swapped.values()):
            paths = [p for p, n in self.swapped.items() if n == name]
            if all(d.ok for d in self.check(*self.variant(only=paths))[0]):
                continue
            for path in paths:
                diffs, _ = self.check(*self.variant(only=[path]))
                bad = [d for d in diffs if not d.ok]
                own = [d for d in bad if d.kind != "loss" and (base_path(d.name) == path
                                                              or d.name.startswith(f"{path}."))]
                if not bad:
                    continue
                if own:
                    first = min(own, key=lambda d: (  # the earliest in the computation, a counter last; of
                        # several calls the last (its grad_output is still clean), then the worst
                        ["layer_output", "buffer", "input_grad", "param_grad"].index(d.kind),
                        not d.dtype.startswith(("float", "bfloat")), -_call(d.name), -d.score))
                    culprits.append(Culprit(path, name, describe(first)))
                else:  # its own tensors match (it may act through state shared with others)
                    culprits.append(Culprit(path, name, f"its own tensors match native's, yet {describe(bad[0])}"))
                for d in bad:
                    consequences.setdefault((d.kind, d.name), []).append(path)
        roots = {c.path for c in culprits}
        for d in flagged:
            if d.ok:
                continue
            if d.kind in ("layer_output", "input_grad") and base_path(d.name) in roots or \
                    d.kind in ("param_grad", "buffer") and d.name.rpartition(".")[0] in roots:
                d.cause = "culprit"
            elif (d.kind, d.name) in consequences:
                d.cause = f"consequence of {', '.join(consequences[(d.kind, d.name)])}"
            else:
                d.cause = "independent"
        return culprits


def compare_config(cfg) -> tuple[Report, object]:
    """``trainer compare``: the config's model and loss, native against custom, on its first training batches.

    Returns the report and the process's ``distributed.Env``: under torchrun each rank
    compares on its own shard of the batches.

    Raises:
        ConfigError: no layer of the model or loss has a custom twin, so there is nothing to compare.
    """
    import dataclasses
    from itertools import islice

    from trainer.errors import ConfigError
    from trainer.loop import Trainer

    # built native, so a broken twin is reported by the comparison, never blamed on the data
    trainer = Trainer(dataclasses.replace(cfg, layers={"default": "native"}))
    device = trainer.device
    batches = [(x.to(device), y.to(device)) for x, y in islice(iter(trainer.train_loader), cfg.compare.batches)]
    comparison = Comparison(trainer.model, trainer.loss_fn, batches, cfg.layers, rtol=cfg.compare.rtol,
                            atol=cfg.compare.atol, seed=cfg.seed, autocast=trainer.autocast)
    if not comparison.swapped:
        raise ConfigError("layers", f"no layer of model {cfg.model.name} or loss {cfg.loss.name} has a custom twin, "
                          "so nothing is compared", suggestion="use registry layers (see `trainer layers`), or "
                          "register a twin for yours with trainer.layers.register")
    return comparison.report(bisect=cfg.compare.bisect), trainer.env


def format_report(report: Report) -> str:
    """The table, worst first, then where each mismatch is, the culprits and per-layer saved bytes."""
    from trainer.cli import table

    if report.error:
        return "\n".join([f"culprit: {c}" for c in report.culprits] + ["MISMATCH: a twin raised"])
    causes = any(d.cause for d in report.tensors)
    rows = [[d.kind, d.name, d.layer or "-", "ok" if d.ok else "MISMATCH" + (" (vacuous)" if d.vacuous else ""),
             f"{d.max_abs_diff:.3g}", f"{d.max_rel_diff:.3g}", f"{d.rel_l2:.3g}", f"{d.cosine:.6f}",
             f"{d.norm_ratio:.6g}", f"{d.score:.3g}", *([d.cause or "-"] if causes else [])] for d in report.tensors]
    out = [table(rows, ["kind", "name", "layer", "result", "max_abs", "max_rel", "rel_l2", "cosine", "norm_ratio",
                        "score", *(["cause"] if causes else [])])]
    vacuous = [d.name for d in report.tensors if d.vacuous and d.kind != "loss"]
    if vacuous:
        out.append(f"note: norms below atol, so these pass vacuously: {', '.join(vacuous)}")
    for d in report.tensors:
        if d.where:
            out.append(f"where: {d.kind} {d.name}: {d.where}")
    if report.memory:
        out.append("")
        out.append(table([[p, m["layer"], m["native"], m["custom"]] for p, m in report.memory.items()],
                         ["layer", "name", "saved bytes native", "saved bytes custom"]))
    for c in report.culprits:
        out.append(f"culprit: {c}")
    failed = sum(not d.ok for d in report.tensors)
    out.append(f"{'ok' if report.ok else 'MISMATCH'}: {len(report.tensors) - failed} of {len(report.tensors)} "
               f"tensors within tolerance")
    return "\n".join(out)
