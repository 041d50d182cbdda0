"""Hand-written autograd.Functions and their module twins, one file per family.

Importing this package registers every built-in twin in ``trainer.layers``.
"""
from trainer.functions import activations, dense, dropout, embedding, losses, norm, softmax  # noqa: F401
