"""trainer: a small config-driven PyTorch trainer whose layers have hand-written autograd.Function twins.

    from trainer import Trainer, load_config
    result = Trainer(load_config("configs/quickstart.yaml", overrides=["optimizer.lr=0.1"])).fit()
"""
from trainer import datasets, layers, losses, models, optimizers, schedulers
from trainer.config import Config, load_config
from trainer.errors import ConfigError

__all__ = ["Config", "ConfigError", "Trainer", "datasets", "layers", "load_config", "losses", "models",
           "optimizers", "schedulers"]


def __getattr__(name: str):
    if name in ("Trainer", "FitResult"):  # the loop imports tensorboard; load it only when asked for
        from trainer import loop
        return getattr(loop, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
