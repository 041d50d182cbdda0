"""Native against custom on the same weights and data: every gradient compared, and bisect to the guilty layer."""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from torch import nn

from trainer import layers
from trainer.build import build
from trainer.check.capture import (LOSS, Capture, OutputMismatch, base_path, diff_captures, owners,  # noqa: F401
                                   run, swapped_layers, call_number)  # (re-exported: this module's API)
from trainer.check.diff import TensorDiff, diff, diffs, size  # noqa: F401  (diff, diffs: part of this module's API)
from trainer.check.locate import raised
from trainer.config import Config
from trainer.distributed import Env
from trainer.errors import ConfigError


def swap_only(model: nn.Module, loss_fn, paths: Iterable[str], impl: str = "custom") -> None:
    """Switch just the module instances at ``paths`` (``loss`` for the loss module)."""
    for path in paths:
        module = loss_fn if path == LOSS else model.get_submodule(path)
        _, native, custom = layers.pair_of(module)
        module.__class__ = custom if impl == "custom" else native



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
                        not d.dtype.startswith(("float", "bfloat")), -call_number(d.name), -d.score))
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


def compare_config(cfg: Config) -> tuple[Report, Env]:
    """``trainer compare``: the config's model and loss, native against custom, on its first training batches.

    Returns the report and the process's ``distributed.Env``: under torchrun each rank
    compares on its own shard of the batches.

    Raises:
        ConfigError: no layer of the model or loss has a custom twin, so there is nothing to compare.
    """
    from itertools import islice

    # the same model, loss, batches and autocast as a training run of cfg; built native, so a broken
    # twin is reported by the comparison (never blamed on the data by build's check), and without
    # shadow mode (which build refuses when nothing runs custom)
    native = dataclasses.replace(cfg, layers={"default": "native"},
                                 compare=dataclasses.replace(cfg.compare, every=None))
    parts = build(native)
    parts.sampler.set_epoch(0)
    device = parts.device
    batches = [(x.to(device), y.to(device)) for x, y in islice(iter(parts.train_loader), cfg.compare.batches)]
    comparison = Comparison(parts.model, parts.loss, batches, cfg.layers, rtol=cfg.compare.rtol,
                            atol=cfg.compare.atol, seed=cfg.seed, autocast=parts.autocast)
    if not comparison.swapped:
        raise ConfigError("layers", f"no layer of model {cfg.model.name} or loss {cfg.loss.name} has a custom twin, "
                          "so nothing is compared", suggestion="use registry layers (see `trainer layers`), or "
                          "register a twin for yours with trainer.layers.register")
    return comparison.report(bisect=cfg.compare.bisect), parts.env
