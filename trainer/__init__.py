"""trainer: a small config-driven PyTorch trainer whose layers have hand-written autograd.Function twins.

    from trainer import Trainer, load_config
    result = Trainer(load_config("configs/quickstart.yaml", overrides=["optimizer.lr=0.1"])).fit()
"""
import importlib
import importlib.util

from trainer.errors import ConfigError

__all__ = ["Config", "ConfigError", "Trainer", "datasets", "layers", "load_config", "losses", "models",
           "optimizers", "schedulers"]

# Submodules (trainer.layers, trainer.config, ...) are imported on first use, not with the package: they
# import torch and yaml (seconds), and the `trainer` command must have its signal handlers in place before
# that, so a Ctrl-C while it loads is one error line.


def __getattr__(name: str):
    if name in ("Config", "load_config"):
        from trainer import config
        return getattr(config, name)
    if name in ("Trainer", "FitResult"):  # the loop imports tensorboard; load it only when asked for
        from trainer import loop
        return getattr(loop, name)
    if not name.startswith("_") and importlib.util.find_spec(f"trainer.{name}") is not None:
        return importlib.import_module(f"trainer.{name}")
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
