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

from trainer import datasets, layers, losses, models, optimizers, schedulers
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
    return layers.swap(loss, cfg.layers if mapping is None else mapping) if isinstance(loss, nn.Module) else loss


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


def check_fit(model: nn.Module, loss_fn, train: Dataset, device: torch.device) -> None:
    """Run two samples through model and loss, so a shape mismatch is a config error, not a crash mid-run."""
    import warnings

    from torch.utils.data import default_collate

    x, y = default_collate([train[i] for i in range(min(2, len(train)))])
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*target size.*")
            loss_fn(model(x.to(device)), y.to(device))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _fits_natively(model, loss_fn, x.to(device), y.to(device)):  # the twins are at fault, not the data
            raise ConfigError("layers", f"a custom twin fails where its native layer runs: {first}",
                              suggestion="run `trainer compare` on this config to name the twin") from None
        raise ConfigError("model", f"the model and loss do not fit the data: {first}",
                          suggestion="check the model's in/out sizes against the dataset and the loss") from None
    finally:
        model.train()


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
