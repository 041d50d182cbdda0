"""One place that turns a config into the parts of a run: ``build(cfg) -> Parts``.

The Trainer, ``trainer compare``, the lockstep run and the NaN diagnosis all build through
here, so they can never disagree about what a config means; a hand-written loop can too.
Checks that need the built parts (float16 without CUDA, a monitor or scheduler that needs
validation data, a batch larger than the data) are made here, before anything is written.
"""
from __future__ import annotations

import contextlib
import math
import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trainer import components, data, distributed, layers, threads
from trainer.config import Component, Config
from trainer.data import ResumableSampler
from trainer.distributed import Env
from trainer.errors import ConfigError


@dataclass
class Parts:
    """Everything a run is made of, built from one config; nothing is written anywhere.

    ``model`` and ``loss`` are on ``device``; ``train_loader`` draws from ``sampler``
    (``set_epoch(epoch)`` before each epoch, as a ``DistributedSampler``); ``val_loader``
    is None without validation data; ``scheduler`` is None without a ``scheduler:``
    section, else it has ``.interval`` in step | epoch | metric. ``autocast`` is the context
    each forward runs in and ``scaler`` the GradScaler (enabled for ``precision: 16`` only).
    """

    cfg: Config
    env: Env
    device: torch.device
    model: nn.Module
    loss: Callable[..., torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_set: Dataset
    val_set: Dataset | None
    train_loader: DataLoader
    sampler: ResumableSampler
    val_loader: DataLoader | None
    batches_per_epoch: int
    steps_per_epoch: int        # optimizer steps: batches_per_epoch / train.accumulate, rounded up
    total_steps: int            # where train.max_steps or train.max_epochs ends the run
    autocast: contextlib.AbstractContextManager
    scaler: torch.amp.GradScaler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build(cfg: Config) -> Parts:
    """The parts of the run ``cfg`` describes, seeded with ``cfg.seed`` and checked.

    Under torchrun this joins the process group (every rank builds the same initial
    weights, then draws its own dropout masks).

    Raises:
        ConfigError: the config cannot run as given (naming the config path).
    """
    t = cfg.train
    env = distributed.setup(t.device)
    device = env.device
    if t.precision == "16" and device.type != "cuda":
        raise ConfigError("train.precision", "float16 training needs CUDA", suggestion="use precision: bf16 on CPU")
    seed_everything(cfg.seed)
    model = build_model(cfg).to(device)
    loss = build_loss(cfg).to(device)
    if env.distributed:
        torch.manual_seed(cfg.seed + env.rank)  # same initial weights, different dropout per rank
    train_set, val_set = build_datasets(cfg)
    train_loader, sampler, val_loader = data.loaders(train_set, val_set, cfg.data, env, cfg.seed)
    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise ConfigError("data.batch_size", f"larger than the {len(train_set)} training samples with drop_last")
    if t.monitor and t.monitor.startswith("val/") and val_loader is None:
        raise ConfigError("train.monitor", f"{t.monitor} needs validation data",
                          suggestion="give the dataset a val_fraction, or monitor train/loss")
    steps_per_epoch = math.ceil(batches_per_epoch / t.accumulate)
    total_steps = min(n for n in [t.max_steps, t.max_epochs and t.max_epochs * steps_per_epoch] if n)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps, steps_per_epoch)
    if scheduler is not None and scheduler.interval == "metric" and val_loader is None:
        raise ConfigError("scheduler.name", f"{cfg.scheduler.name} watches val/loss, but there is no validation data",
                          suggestion="give the dataset a val_fraction, or pick another scheduler")
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "16")
    low = {"bf16": torch.bfloat16, "16": torch.float16}.get(t.precision)
    autocast = torch.autocast(device.type, dtype=low) if low else contextlib.nullcontext()
    if cfg.compare.every and not runs_custom(model, loss):
        raise ConfigError("compare.every", "shadow mode compares swapped layers, but no layer runs custom",
                          suggestion="set layers.default: custom, or name layers under layers:")
    check_fit(model, loss, train_set, device, t.monitor)
    for name in unused_layer_entries(cfg, model, loss):
        warning = (f"warning: layers.{name}: {cfg.model.name} and {cfg.loss.name} have no {name} layer, so this entry "
                   "swaps nothing")
        if env.main and warning not in WARNED:  # once, however often a sweep or a check builds the config
            WARNED.add(warning)
            print(warning, file=sys.stderr)
    return Parts(cfg, env, device, model, loss, optimizer, scheduler, train_set, val_set, train_loader, sampler,
                 val_loader, batches_per_epoch, steps_per_epoch, total_steps, autocast, scaler)


WARNED: set[str] = set()  # warnings this process already printed


def unused_layer_entries(cfg: Config, *modules: Any) -> list[str]:
    """The ``layers:`` entries (other than ``default``) naming a layer that ``modules`` do not contain."""
    present = {info[0] for module in modules if isinstance(module, nn.Module) for m in module.modules()
               if (info := layers.impl_of(m)) is not None}
    return [name for name in cfg.layers if name != "default" and name not in present]


def swapped_layers(cfg: Config) -> list[str]:
    """``0.relu -> CustomReLU``-style entries: where ``cfg`` runs a custom twin (model, then ``loss``)."""
    seed_everything(cfg.seed)
    out = []
    for prefix, module in (("", build_model(cfg)), ("loss", build_loss(cfg))):
        for name, m in module.named_modules():
            if (info := layers.impl_of(m)) is not None and info[1] == "custom":
                out.append(f"{'.'.join(p for p in (prefix, name) if p) or 'model'} -> {type(m).__name__}")
    return out


def call(section: str, comp: Component, *args: Any, **injected: Any) -> Any:
    """Build ``comp`` from its registry entry; any complaint from the entry becomes a ConfigError under ``section``."""
    entry: Callable[..., Any] = components.registry(section).get(comp.name, f"{section}.name")
    threads.warm_up()  # before any component computes: the process's first parallel regions are on throwaway data
    try:
        return entry(*args, **injected, **comp.kwargs)
    except ConfigError as e:
        raise e.under(section) from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(section, f"{comp.name} rejected its arguments: {e}",
                          suggestion=f"check the keys under {section}:") from None


def build_model(cfg: Config, mapping: Mapping[str, str] | None = None) -> nn.Module:
    """The config's model with its registry layers swapped per ``mapping`` (default: ``cfg.layers``)."""
    model = call("model", cfg.model)
    if not isinstance(model, nn.Module):
        raise ConfigError("model.name", f"{cfg.model.name} returned {type(model).__name__}, not an nn.Module")
    return layers.swap(model, cfg.layers if mapping is None else mapping)


def build_loss(cfg: Config, mapping: Mapping[str, str] | None = None) -> nn.Module:
    """The config's loss module, swapped like the model (each built-in loss is a layer with a twin)."""
    loss = call("loss", cfg.loss)
    if not callable(loss):
        raise ConfigError("loss.name", f"{cfg.loss.name} returned {type(loss).__name__}, not a callable")
    if not isinstance(loss, nn.Module):  # a plain function: a module around it moves to the device like any other
        loss = LossFunction(loss)
    return layers.swap(loss, cfg.layers if mapping is None else mapping) if isinstance(loss, nn.Module) else loss


class LossFunction(nn.Module):
    """A loss given as a plain function ``fn(output, target)``, as a module."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(output, target)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    return call("optimizer", cfg.optimizer, [p for p in model.parameters() if p.requires_grad])


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int | None,
                    steps_per_epoch: int) -> Any:
    """The scheduler (with ``.interval`` in step|epoch|metric), or None."""
    if cfg.scheduler is None:
        return None
    scheduler = call("scheduler", cfg.scheduler, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    scheduler.interval = getattr(scheduler, "interval", "step")
    return scheduler


def build_datasets(cfg: Config) -> tuple[Dataset, Dataset | None]:
    """``(train, val)``: a dataset entry returns a Dataset (all for training) or ``{"train", "val"}``."""
    data = call("data", cfg.data)
    if isinstance(data, Mapping):
        unknown = set(data) - {"train", "val"}
        if "train" not in data or unknown:
            raise ConfigError("data.name", f"{cfg.data.name} returned keys {sorted(data)}",
                              suggestion='a dataset entry returns a Dataset or {"train": ..., "val": ...}')
        train, val = data["train"], data.get("val")
    else:
        train, val = data, None
    if len(train) == 0:
        raise ConfigError("data", "the training set is empty")
    return train, val


def runs_custom(*modules: Any) -> bool:
    """Whether any registry layer inside ``modules`` (nn.Modules; other callables are skipped) runs its twin."""
    return any((info := layers.impl_of(m)) is not None and info[1] == "custom"
               for module in modules if isinstance(module, nn.Module) for m in module.modules())


def check_fit(model: nn.Module, loss_fn, train: Dataset, device: torch.device, monitor: str | None = None) -> None:
    """Run two samples through model and loss, so a mismatch is a config error, not a crash mid-run.

    Also checked here, where the outputs are known: samples are (input, target) pairs, the
    loss is one number, and ``train.monitor: val/accuracy`` has class scores to measure.
    """
    import warnings

    from torch.utils.data import default_collate

    samples = [train[i] for i in range(min(2, len(train)))]
    for sample in samples:
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            size = f"{len(sample)}-tuple" if isinstance(sample, (tuple, list)) else type(sample).__name__
            raise ConfigError("data.name", f"a training sample is a {size}, not an (input, target) pair",
                              suggestion="make the dataset's __getitem__ return (input, target)")
    x, y = default_collate(samples)
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*target size.*")
            out = model(x.to(device))
            loss = loss_fn(out, y.to(device))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _fits_natively(model, loss_fn, x.to(device), y.to(device)):  # the twins are at fault, not the data
            raise ConfigError("layers", f"a custom twin fails where its native layer runs: {first}",
                              suggestion="run `trainer compare` on this config to name the twin") from None
        raise ConfigError("model", f"the model and loss do not fit the data: {first}",
                          suggestion="check the model's in/out sizes against the dataset and the loss") from None
    finally:
        model.train()
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()):
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConfigError("loss", f"returned {got}, but a training step backpropagates one number",
                          suggestion="reduce the loss to a scalar (mean or sum)")
    # as Trainer.evaluate decides whether there is an accuracy to measure
    classes = isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[1] > 1 and not y.is_floating_point()
    if monitor == "val/accuracy" and not classes:
        raise ConfigError("train.monitor", "val/accuracy is measured only for class scores against class-index "
                          f"targets; this model gives {tuple(out.shape[1:])} per sample for {y.dtype} targets",
                          suggestion="monitor val/loss")


def _fits_natively(model: nn.Module, loss_fn, x, y) -> bool:
    """Whether model and loss run on (x, y) with every swapped twin switched back to native (then restored)."""
    mods = [m for root in (model, loss_fn) if isinstance(root, nn.Module) for m in root.modules()]
    was = {m: type(m) for m in mods if (info := layers.impl_of(m)) and info[1] == "custom"}
    if not was:
        return False
    try:
        for m in was:
            m.__class__ = layers.pair_of(m)[1]
        with torch.no_grad():
            loss_fn(model(x), y)
        return True
    except Exception:  # noqa: BLE001  (native fails too: the data is at fault)
        return False
    finally:
        for m, cls in was.items():
            m.__class__ = cls
