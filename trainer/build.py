"""One place that turns a config into model, loss, optimizer, scheduler and data.

The training loop and the gradient comparison both build through here, so they can
never disagree about what a config means.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from trainer import datasets, layers, losses, models, optimizers, schedulers, threads
from trainer.config import Component, Config
from trainer.errors import ConfigError
from trainer.registry import Registry

# Arguments the builder passes itself, per config section; a config cannot set them.
INJECTED: dict[str, tuple[str, ...]] = {"optimizer": ("params",), "scheduler": schedulers.INJECTED}


def registry(section: str) -> Registry:
    """The registry a config section picks its entry from."""
    return {"model": models.REGISTRY, "loss": losses.REGISTRY, "optimizer": optimizers.REGISTRY,
            "scheduler": schedulers.REGISTRY, "data": datasets.REGISTRY}[section]


def call(section: str, comp: Component, *args: Any, **injected: Any) -> Any:
    """Build ``comp`` from its registry entry; any complaint from the entry becomes a ConfigError under ``section``."""
    entry: Callable[..., Any] = registry(section).get(comp.name, f"{section}.name")
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
        raise ConfigError("model", f"the model and loss do not fit the data: {str(e).strip().splitlines()[0]}",
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
