"""Which registry each config section picks its ``name`` from, and the arguments the builder passes itself.

The config checks a section's keys against its entry's signature and the builder calls
the entry; both read this table, so neither needs the other.
"""
from __future__ import annotations

from trainer import datasets, losses, models, optimizers, schedulers
from trainer.registry import Registry

# Arguments the builder passes itself, per config section; a config cannot set them.
INJECTED: dict[str, tuple[str, ...]] = {"optimizer": ("params",), "scheduler": schedulers.INJECTED}


def registry(section: str) -> Registry:
    """The registry a config section picks its entry from."""
    return {"model": models.REGISTRY, "loss": losses.REGISTRY, "optimizer": optimizers.REGISTRY,
            "scheduler": schedulers.REGISTRY, "data": datasets.REGISTRY}[section]
