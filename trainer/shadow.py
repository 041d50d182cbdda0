"""Comparison inside training: shadow mode (each swapped layer re-run natively every N steps) and the lockstep run."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from trainer import layers
from trainer.checkpoint import reseed
from trainer.compare import LOSS, diff, diffs, swapped_layers


class Shadow:
    """Every ``every`` steps, each custom layer and its native counterpart run on what that layer saw in training.

    On a shadow step, hooks keep each swapped layer's inputs and incoming grad_output;
    afterwards both implementations re-run on exactly those, and the differences of
    output, input grad and parameter grads, with the bytes each saved for backward, go to
    TensorBoard as ``compare/<layer>/<tensor>/<metric>``. Training follows the model's
    own path throughout; buffers (batch-norm statistics) are restored after the re-runs.
    Between shadow steps no hook is installed, so the cost is zero.
    """

    def __init__(self, model: nn.Module, loss_fn, every: int, rtol: float | None = None, atol: float | None = None):
        self.every, self.rtol, self.atol = every, rtol, atol
        self.modules = {p: (loss_fn if p == LOSS else model.get_submodule(p)) for p in swapped_layers(model, loss_fn)}
        self.handles: list = []
        self.seen: dict[str, dict] = {}

    @property
    def armed(self) -> bool:
        return bool(self.handles)

    def before(self, step: int) -> None:
        """Called before step ``step`` runs: install the hooks if it is a shadow step."""
        if step % self.every == 0 and self.modules:
            for path, m in self.modules.items():
                self.handles.append(m.register_forward_hook(self._keep(path)))

    def _keep(self, path: str):
        def hook(module, args, out):
            if path in self.seen:  # accumulation runs a layer several times a step: keep the first
                return
            rec = self.seen[path] = {"args": [a.detach() if isinstance(a, torch.Tensor) else a for a in args],
                                     "wants": [isinstance(a, torch.Tensor) and a.requires_grad for a in args]}
            if out.requires_grad:
                out.register_hook(lambda g: rec.setdefault("grad", g.detach()))
        return hook

    def collect(self) -> dict[str, float]:
        """Remove the hooks, re-run every layer both ways, and return the scalars to log."""
        for h in self.handles:
            h.remove()
        self.handles = []
        pairs, values = [], {}
        for path, rec in self.seen.items():
            if "grad" not in rec:
                continue
            (out_n, grads_n, bytes_n), (out_c, grads_c, bytes_c) = self.rerun_both(self.modules[path], rec)
            pairs.append((f"{path}/output", "layer_output", out_c, out_n))
            pairs += [(f"{path}/{k}", "input_grad" if k.endswith("_grad") else "param_grad", grads_c[k], grads_n[k])
                      for k in grads_n]
            values[f"compare/{path}/saved_bytes/native"] = bytes_n
            values[f"compare/{path}/saved_bytes/custom"] = bytes_c
        for d in diffs(pairs, self.rtol, self.atol):  # all layers' numbers at once
            for metric in ("max_abs_diff", "cosine", "norm_ratio"):
                values[f"compare/{d.name}/{metric}"] = getattr(d, metric)
            values[f"compare/{d.name}/ok"] = float(d.ok)
        self.seen = {}
        return values

    def rerun_both(self, module: nn.Module, rec: dict) -> list[tuple[torch.Tensor, dict, int]]:
        """(output, grads, saved bytes) of the native, then the custom implementation, on what training saw."""
        _, native_cls, custom_cls = layers.pair_of(module)
        was = type(module)
        buffers = {k: b.clone() for k, b in module.named_buffers()}
        results = []
        try:
            for cls in (native_cls, custom_cls):
                module.__class__ = cls
                results.append(self._rerun(module, rec))
                for k, b in module.named_buffers():
                    b.copy_(buffers[k])
        finally:
            module.__class__ = was
        return results

    @staticmethod
    def _rerun(module: nn.Module, rec: dict):
        # the first argument always (a layer's input grad is compared even where training needs none)
        args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                and (i == 0 or wants) else a for i, (a, wants) in enumerate(zip(rec["args"], rec["wants"]))]
        wrt = {("input_grad" if i == 0 else f"arg{i}_grad"): a for i, a in enumerate(args)
               if isinstance(a, torch.Tensor) and a.requires_grad}
        wrt.update({n: p for n, p in module.named_parameters() if p.requires_grad})
        kept = {t.untyped_storage().data_ptr() for t in (*wrt.values(), *module.buffers())}  # alive anyway
        storages: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in kept:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        device = next(iter(wrt.values()), rec["grad"]).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            reseed(device, 0)  # the same dropout mask both ways
            out = module(*args)
        grads = torch.autograd.grad(out, list(wrt.values()), rec["grad"], allow_unused=True)
        grads = {k: g if g is not None else torch.zeros_like(v) for (k, v), g in zip(wrt.items(), grads)}
        return out.detach(), grads, sum(storages.values())
