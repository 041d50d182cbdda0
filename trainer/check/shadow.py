"""Shadow mode (``compare.every: N``): each swapped layer re-run natively every N training steps, as a callback."""
from __future__ import annotations

import sys

import torch
from torch import nn

from trainer import layers
from trainer.callbacks import Callback
from trainer.check.capture import LOSS, swapped_layers
from trainer.check.diff import diffs, size
from trainer.checkpoint import reseed

PREFIX = "vs_native"  # shadow tags: after train/ and val/ in TensorBoard's alphabetical list


class ShadowMismatch(RuntimeError):
    """Shadow mode with ``compare.fail``: a swapped layer differed from its native counterpart."""


class Shadow(Callback):
    """Every ``every`` steps, each custom layer and its native counterpart run on what that layer saw in training.

    On a shadow step, hooks keep each swapped layer's inputs and incoming grad_output;
    afterwards both implementations re-run on exactly those, and the differences of
    output, input grad, parameter grads and the buffers each run leaves (batch-norm
    statistics), with the bytes each saved for backward, go to TensorBoard as
    ``vs_native/<module path>.<layer>/<tensor>/<metric>``. Training follows the model's own
    path throughout; buffers are restored after the re-runs. Between shadow steps no hook
    is installed, so the cost is zero.

    The first failing check of each layer prints one ``warning:`` line; ``failures`` keeps
    every failing step per layer for ``summary``, which ``on_end`` prints. With ``fail``, the
    first failing check raises ``ShadowMismatch`` instead (the CLI exits 1).

    ``trainer.check.attach`` adds one to a Trainer whose config sets ``compare.every``;
    ``before_step`` and ``after_step`` are its hooks into the loop.
    """

    def __init__(self, model: nn.Module, loss_fn, every: int, rtol: float | None = None, atol: float | None = None,
                 fail: bool = False):
        self.every, self.rtol, self.atol, self.fail = every, rtol, atol, fail
        self.names = swapped_layers(model, loss_fn)
        self.modules = {p: (loss_fn if p == LOSS else model.get_submodule(p)) for p in self.names}
        self.handles: list = []
        self.seen: dict[str, dict] = {}
        self.step = 0
        self.checks = 0                                 # shadow steps compared so far
        self.failures: dict[str, dict[int, list[str]]] = {}  # layer label -> step -> failing tensors
        self.speak = True                               # print warnings and the summary (rank 0 only)

    def label(self, path: str) -> str:
        """``encoder.1.gelu``: the module path and the layer's registry name, as the tags name it."""
        return f"{path}.{self.names[path]}"

    @property
    def armed(self) -> bool:
        return bool(self.handles)

    def before_step(self, trainer) -> None:
        """Before step ``trainer.step + 1``: install the hooks if it is a shadow step."""
        self.step = trainer.step + 1
        self.speak = trainer.env.main
        if self.step % self.every == 0 and self.modules:
            for path, m in self.modules.items():
                self.handles.append(m.register_forward_hook(self._keep(path)))

    def after_step(self, trainer, loss: torch.Tensor) -> None:
        """After a shadow step: compare, and log the scalars at that step."""
        if self.armed:
            trainer.log.scalars(trainer.step, self.collect())

    def on_end(self, trainer) -> None:
        """The run finished: print the summary (which layers failed, at which steps)."""
        if trainer.env.main:
            print("\n".join(self.summary()), file=sys.stderr)

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
            label = self.label(path)
            pairs.append((f"{label}/output", "layer_output", out_c, out_n))
            pairs += [(f"{label}/{k}", _kind(k), grads_c[k], grads_n[k]) for k in grads_n]
            values[f"{PREFIX}/{label}/saved_bytes/native"] = bytes_n
            values[f"{PREFIX}/{label}/saved_bytes/custom"] = bytes_c
        failed = []
        for d in diffs(pairs, self.rtol, self.atol):  # all layers' numbers at once
            for metric in ("max_abs_diff", "rel_l2", "cosine", "norm_ratio", "score"):
                values[f"{PREFIX}/{d.name}/{metric}"] = getattr(d, metric)
            values[f"{PREFIX}/{d.name}/ok"] = float(d.ok)
            if not d.ok:
                failed.append(d)
        self.seen = {}
        self.checks += 1
        self._report(failed)
        return values

    def _report(self, failed: list) -> None:
        """Keep the failures; one warning line for a layer's first; raise with ``fail``."""
        for d in sorted(failed, key=lambda d: -d.score):
            label, tensor = d.name.split("/", 1)
            first = label not in self.failures
            self.failures.setdefault(label, {}).setdefault(self.step, []).append(tensor)
            path, _, name = label.rpartition(".")
            line = f"layer {path} ({name}): {tensor} differs from native at step {self.step} ({size(d)})"
            if self.fail:
                raise ShadowMismatch(f"shadow mode: {line}; stopped (compare.fail: true)")
            if first and self.speak:
                print(f"warning: shadow mode: {line}; the run goes on, see the summary at its end", file=sys.stderr)

    def summary(self) -> list[str]:
        """One line per layer that failed a check, with the steps and tensors; or one line saying all passed."""
        if not self.failures:
            return [f"shadow mode: every swapped layer within tolerance at all {self.checks} checks"]
        out = []
        for label, steps in self.failures.items():
            tensors = sorted({t for ts in steps.values() for t in ts})
            shown = ", ".join(map(str, list(steps)[:10])) + (", ..." if len(steps) > 10 else "")
            path, _, name = label.rpartition(".")
            out.append(f"shadow mode: layer {path} ({name}) failed {len(steps)} of {self.checks} checks, at steps {shown} "
                       f"({', '.join(tensors)})")
        return out

    def rerun_both(self, module: nn.Module, rec: dict) -> list[tuple[torch.Tensor, dict, int]]:
        """(output, grads, saved bytes) of the native, then the custom implementation, on what training saw."""
        _, native_cls, custom_cls = layers.pair_of(module)
        was = type(module)
        buffers = {k: b.clone() for k, b in module.named_buffers()}
        results = []
        try:
            for cls in (native_cls, custom_cls):
                module.__class__ = cls
                out, grads, saved = self._rerun(module, rec)
                for k, b in module.named_buffers():  # what this implementation left in them, then as before
                    if b.is_floating_point():
                        grads[f"buffer.{k}"] = b.clone()
                    b.copy_(buffers[k])
                results.append((out, grads, saved))
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


def _kind(key: str) -> str:
    return "input_grad" if key.endswith("_grad") else "buffer" if key.startswith("buffer.") else "param_grad"
