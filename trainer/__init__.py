"""trainer: a small config-driven PyTorch trainer whose layers have hand-written autograd.Function twins.

    from trainer import Trainer, load_config
    result = Trainer(load_config("configs/quickstart.yaml", overrides=["optimizer.lr=0.1"])).fit()

Every name here is imported on first use (``trainer --help`` answers without importing torch).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it from here

# public name -> the module that defines it; a module of this package is its own entry
_LAZY = {"Trainer": "trainer.loop", "FitResult": "trainer.loop", "Config": "trainer.config",
         "load_config": "trainer.config", "ConfigError": "trainer.errors", "Callback": "trainer.callbacks",
         "build": "trainer.build", "datasets": "trainer.datasets",
         "layers": "trainer.layers", "losses": "trainer.losses", "models": "trainer.models",
         "optimizers": "trainer.optimizers", "schedulers": "trainer.schedulers"}

__all__ = ["Callback", "Config", "ConfigError", "Trainer", "build", "datasets", "layers", "load_config",
           "losses", "models", "optimizers", "schedulers"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    if name == "Trainer":
        importlib.import_module("trainer.check.attach")  # shadow mode and NaN diagnosis attach to every Trainer
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"trainer.{name}" else getattr(module, name)
    globals()[name] = value  # the next lookup finds it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
