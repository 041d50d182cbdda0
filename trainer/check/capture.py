"""What a model does on a few batches, recorded layer by layer, and two such records compared.

``run`` feeds the batches forward and backward with hooks on the watched layers (every call of a
module kept, with its input, output and input grad); ``diff_captures`` compares a custom run's
record with the native one's, tensor by tensor, and says where each mismatch is.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer import layers
from trainer.check.diff import TensorDiff, diffs
from trainer.check.locate import where
from trainer.checkpoint import reseed

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


def call_number(name: str) -> int:
    return int(name.rsplit(" (call ", 1)[1][:-1]) if " (call " in name else 0

