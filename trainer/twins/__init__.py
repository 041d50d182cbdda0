"""The built-in twins: hand-written autograd.Functions and their modules, one file per family, and their check cases.
They import only torch and ``amp``; ``trainer.layers`` registers them."""
