"""Resuming a run: its newest good checkpoint loaded into the built parts, the overrides given on resume
applied (or refused in one error line), and each resume recorded in ``config.yaml`` and ``resumes.yaml``.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from trainer import checkpoint
from trainer.config import Component, Config
from trainer.errors import ConfigError
from trainer.logs import flatten

# Annotations name the Trainer as a string: this module is below the loop and never imports it.


def state_dict(trainer: "Trainer") -> dict[str, Any]:
    """Everything an exact resume of ``trainer`` needs, as tensors and plain values (``weights_only`` loading)."""
    return {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "scaler": trainer.scaler.state_dict(),
        "step": trainer.step, "epoch": trainer.epoch, "batch_in_epoch": trainer.batch_in_epoch,
        "rng": checkpoint.rng_state(),
        "monitor": trainer.monitor.state_dict(),
        "metrics": dict(trainer.metrics),
        "config": trainer.config_yaml,
    }


def restore(trainer: "Trainer", state: dict[str, Any]) -> None:
    """``trainer`` continues from ``state``: its parts, data position, monitor and metrics now; the RNG state
    is kept for ``fit`` to set as training starts (whatever runs in between would otherwise draw from it)."""
    load_parts(state, trainer.model, trainer.optimizer, trainer.scheduler, trainer.scaler, trainer.cfg.optimizer)
    trainer.step, trainer.epoch, trainer.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    trainer.monitor.load_state_dict(state.get("monitor", {"best": None, "bad_checks": 0}))
    trainer.metrics = dict(state.get("metrics", {}))
    trainer._rng = state["rng"]
    trainer._saved_at = trainer.step  # that step's checkpoint exists: no second save of it
    trainer.stopped_early = trainer.monitor.exhausted  # an early-stopped run stays finished


def open_run(run_dir: Path, keep: int, *, background: bool, lock: bool
             ) -> tuple[checkpoint.Checkpoints, dict[str, Any]]:
    """The run's checkpoints and the state of its newest good one; a damaged newer one is named on stderr."""
    checkpoints = checkpoint.Checkpoints(run_dir, keep, background=background, lock=lock)
    state, path, problems = checkpoints.load()
    for problem in problems:
        print(f"warning: {problem}; resuming from {path.relative_to(run_dir)} (step {state['step']}), "
              "the newest good checkpoint", file=sys.stderr)
    return checkpoints, state


def load_parts(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               scaler: Any, optimizer_cfg: Component) -> None:
    """Model, optimizer, scheduler and GradScaler as the checkpoint left them, with the optimizer's
    hyperparameters given on resume applied; a checkpoint of another model is one ``ConfigError``."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        why = first_difference(state.get("model", {}), model.state_dict()) or str(e).strip().splitlines()[0]
        raise ConfigError("--resume", f"the checkpoint does not fit this config: {why}",
                          suggestion="resume with the config the run was started with (its config.yaml)") from None
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    saved = state.get("config") or {}
    saved = yaml.safe_load(saved) if isinstance(saved, str) else saved  # the YAML text (a dict is read too)
    apply_optimizer_changes(optimizer, scheduler, optimizer_cfg, saved.get("optimizer"))
    scaler.load_state_dict(state["scaler"])


def first_difference(saved: dict[str, Any], model: dict[str, Any]) -> str | None:
    """The first parameter that a checkpoint's model and this model disagree on, in words."""
    for name, tensor in model.items():
        if name not in saved:
            return f"parameter {name} {list(tensor.shape)} is not in the checkpoint"
        if saved[name].shape != tensor.shape:
            return (f"parameter {name} is {list(saved[name].shape)} in the checkpoint, "
                    f"{list(tensor.shape)} in this model")
    extra = next((name for name in saved if name not in model), None)
    return f"the checkpoint has parameter {extra}, which this model lacks" if extra else None


def apply_optimizer_changes(optimizer: torch.optim.Optimizer, scheduler: Any, now: Component,
                            saved: dict[str, Any] | None) -> None:
    """Hyperparameters changed on resume (``optimizer.lr=0.5 --resume RUN``) go into the restored optimizer,
    so what runs is what the run's config records; what cannot be carried over is refused.

    ``load_state_dict`` brings back the checkpoint's param groups, old values included, so without
    this an override would be recorded but not run.
    """
    if saved is None:  # a checkpoint without its config: nothing to tell apart
        return
    if saved.get("name") != now.name:
        raise ConfigError("optimizer.name", f"the run was trained with {saved.get('name')}, its state cannot "
                          f"become {now.name}'s", suggestion="resume with the run's optimizer, or start a new run")
    changed = {k: v for k, v in now.kwargs.items() if saved.get(k, v) != v}
    if "lr" in changed and scheduler is not None:
        raise ConfigError("optimizer.lr", "the run's scheduler sets the learning rate from its own state",
                          suggestion="resume without changing optimizer.lr, or start a new run")
    for key, value in changed.items():
        for group in optimizer.param_groups:
            if key not in group:
                raise ConfigError(f"optimizer.{key}", "cannot be changed on resume",
                                  suggestion=f"resume without optimizer.{key}, or start a new run")
            group[key] = tuple(value) if isinstance(group[key], tuple) else value


def record_resume(run_dir: Path, cfg: Config, step: int) -> None:
    """Keys this resume changed go into ``config.yaml``; ``resumes.yaml`` keeps each resume (time, step, keys)."""
    path = run_dir / "config.yaml"
    old = flatten(yaml.safe_load(path.read_text())) if path.exists() else {}
    new = flatten(cfg.to_dict())
    changed = {k: v for k, v in new.items() if k not in old or old[k] != v}
    history = run_dir / "resumes.yaml"
    entries = (yaml.safe_load(history.read_text()) or []) if history.exists() else []
    entries.append({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "step": step, "overrides": changed})
    history.write_text(yaml.safe_dump(entries, sort_keys=False))
    path.write_text(cfg.to_yaml())
