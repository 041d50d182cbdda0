"""The layer registry with every built-in twin registered: ``register``, ``swap``, ``get``, ``specs``, ...

The registry itself lives in ``trainer.twins.registry``, which the twins import to register
themselves; this module imports the twins, so whoever uses it sees the whole registry.
"""
from __future__ import annotations

from trainer.twins import activations, dense, dropout, embedding, losses, norm, softmax  # noqa: F401  (registers)
from trainer.twins.registry import (IMPLS, Case, LayerSpec, check_mapping, get, impl_of, names, pair_of, register,
                                    specs, swap)

__all__ = ["IMPLS", "Case", "LayerSpec", "check_mapping", "get", "impl_of", "names", "pair_of", "register", "specs",
           "swap"]
