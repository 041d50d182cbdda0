"""Native against custom on the same weights and data: every gradient compared, and bisect to the guilty layer."""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from trainer import layers
from trainer.build import build
from trainer.check.diff import TensorDiff, diff, diffs  # noqa: F401  (diff: part of this module's API)
from trainer.checkpoint import reseed
from trainer.config import Config
from trainer.distributed import Env

LOSS = "loss"  # the module path under which the loss module is reported


@dataclass
class Capture:
    """What one model produced on the batches: loss, output, grads, and per watched layer its output and dx."""

    losses: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    param_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    input_grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    saved_bytes: dict[str, int] = field(default_factory=dict)


def swapped_layers(model: nn.Module, loss_fn: nn.Module | None = None) -> dict[str, str]:
    """``{module path: layer name}`` of every registry layer running its custom twin (the loss as ``loss``)."""
    found = {path: info[0] for path, m in model.named_modules() if (info := layers.impl_of(m)) and info[1] == "custom"}
    if isinstance(loss_fn, nn.Module) and (info := layers.impl_of(loss_fn)) and info[1] == "custom":
        found[LOSS] = info[0]
    return found


def run(model: nn.Module, loss_fn, batches: Iterable, watch: Iterable[str], seed: int = 0,
        autocast=None) -> Capture:
    """Forward and backward every batch (grads accumulate), recording what ``watch``'s layers saw and produced."""
    cap = Capture()
    modules = {p: (loss_fn if p == LOSS else model.get_submodule(p)) for p in watch}
    stack: list[str] = []
    storages: dict[str, dict[int, int]] = {p: {} for p in modules}
    inputs: dict[str, torch.Tensor] = {}

    def pre(path):
        def hook(module, args):
            stack.append(path)
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is not None and x.requires_grad:
                x.retain_grad()
                inputs[path] = x
        return hook

    def post(path):
        def hook(module, args, out):
            stack.pop()
            cap.layer_outputs.setdefault(path, []).append(out.detach().clone())
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
            for path, t in inputs.items():
                cap.input_grads.setdefault(path, []).append(t.grad.detach().clone() if t.grad is not None
                                                            else torch.zeros_like(t))
    finally:
        for h in handles:
            h.remove()
    cap.param_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    cap.saved_bytes = {p: sum(s.values()) for p, s in storages.items()}
    return cap


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ts]) if ts else torch.zeros(0)


def diff_captures(custom: Capture, native: Capture, names: Mapping[str, str], rtol: float | None = None,
                  atol: float | None = None) -> list[TensorDiff]:
    """Every pair of tensors: loss, output, each param grad, and each watched layer's output and input grad."""
    pairs = [("loss", "loss", torch.cat(custom.losses), torch.cat(native.losses)),
             ("output", "output", _flat(custom.outputs), _flat(native.outputs))]
    for name in sorted(native.param_grads.keys() | custom.param_grads.keys()):
        c, n = custom.param_grads.get(name), native.param_grads.get(name)
        missing = torch.full_like(n if c is None else c, math.nan)  # one side has no grad: never equal
        pairs.append((name, "param_grad", missing if c is None else c, missing if n is None else n))
    for path in names:
        if path in native.layer_outputs:
            pairs.append((path, "layer_output", _flat(custom.layer_outputs[path]), _flat(native.layer_outputs[path])))
        if path in native.input_grads:
            pairs.append((path, "input_grad", _flat(custom.input_grads.get(path, [])), _flat(native.input_grads[path])))
    out = diffs(pairs, rtol, atol)
    return sorted(out, key=lambda d: (d.ok, -d.score if not math.isnan(d.score) else math.inf))


def swap_only(model: nn.Module, loss_fn, paths: Iterable[str], impl: str = "custom") -> None:
    """Switch just the module instances at ``paths`` (``loss`` for the loss module)."""
    for path in paths:
        module = loss_fn if path == LOSS else model.get_submodule(path)
        _, native, custom = layers.pair_of(module)
        module.__class__ = custom if impl == "custom" else native


def describe(d: TensorDiff) -> str:
    """``input grad ×2 native``, ``param grad 0.weight has the wrong sign``, ``output differs by 0.3``."""
    what = {"layer_output": "output", "input_grad": "input grad", "param_grad": f"param grad {d.name}",
            "loss": "loss", "output": "model output"}[d.kind]
    if d.kind in ("layer_output", "loss", "output"):
        return f"{what} differs by up to {d.max_abs_diff:.3g} (cosine {d.cosine:.4f})"
    if math.isnan(d.norm_ratio):
        return f"{what} has the wrong shape"
    if d.cosine > 0.999:
        return f"{what} ×{d.norm_ratio:.3g} native"
    if d.cosine < -0.999:
        return f"{what} has the wrong sign (×{-d.norm_ratio:.3g} native)"
    return f"{what} points elsewhere (cosine {d.cosine:.3f}, norm ×{d.norm_ratio:.3g} native)"



@dataclass
class Culprit:
    """A layer whose twin alone reproduces a mismatch."""

    path: str           # module path, or "loss"
    layer: str          # registry name
    what: str           # what differs, in words

    def __str__(self) -> str:
        return f"layer {self.path} ({self.layer}): {self.what}"


@dataclass
class Report:
    ok: bool
    tensors: list[TensorDiff]
    culprits: list[Culprit] = field(default_factory=list)
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # path -> {"layer", "native", "custom"}

    def to_dict(self) -> dict:
        return {"ok": self.ok, "tensors": [asdict(t) for t in self.tensors],
                "culprits": [asdict(c) | {"message": str(c)} for c in self.culprits], "memory": self.memory}


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
        self.native = run(*self.base, batches, self.swapped, seed, autocast)

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
        cap = run(model, loss_fn, self.batches, self.swapped, self.seed, self.autocast)
        return diff_captures(cap, self.native, self.swapped, self.rtol, self.atol), cap

    def report(self, bisect: bool = True) -> Report:
        diffs, cap = self.check(*self.variant(only=self.swapped))
        memory = {p: {"layer": n, "native": self.native.saved_bytes.get(p, 0), "custom": cap.saved_bytes.get(p, 0)}
                  for p, n in self.swapped.items()}
        ok = all(d.ok for d in diffs)
        return Report(ok, diffs, [] if ok or not bisect else self.bisect(), memory)

    def bisect(self) -> list[Culprit]:
        """Swap one registry layer at a time, then one instance of each guilty layer, to name the culprits."""
        culprits = []
        for name in dict.fromkeys(self.swapped.values()):
            paths = [p for p, n in self.swapped.items() if n == name]
            if all(d.ok for d in self.check(*self.variant(only=paths))[0]):
                continue
            for path in paths:
                diffs, _ = self.check(*self.variant(only=[path]))
                own = [d for d in diffs if not d.ok and (d.name == path or d.name.startswith(f"{path}."))]
                if own or not all(d.ok for d in diffs):
                    first = min(own or [d for d in diffs if not d.ok],
                                key=lambda d: ["layer_output", "input_grad", "param_grad"].index(d.kind)
                                if d.kind in ("layer_output", "input_grad", "param_grad") else 3)
                    culprits.append(Culprit(path, name, describe(first)))
        return culprits


def compare_config(cfg: Config) -> tuple[Report, Env]:
    """``trainer compare``: the config's model and loss, native against custom, on its first training batches.

    Returns the report and the process's ``distributed.Env``: under torchrun each rank
    compares on its own shard of the batches.
    """
    from itertools import islice

    parts = build(cfg)  # the same model, loss, batches and autocast as a training run of cfg
    parts.sampler.set_epoch(0)
    device = parts.device
    batches = [(x.to(device), y.to(device)) for x, y in islice(iter(parts.train_loader), cfg.compare.batches)]
    comparison = Comparison(parts.model, parts.loss, batches, cfg.layers, rtol=cfg.compare.rtol,
                            atol=cfg.compare.atol, seed=cfg.seed, autocast=parts.autocast)
    return comparison.report(bisect=cfg.compare.bisect), parts.env
