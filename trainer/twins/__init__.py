"""The built-in twins: hand-written autograd.Functions and their modules, one file per family.

Each family registers its layers in ``trainer.twins.registry`` when imported;
``trainer.layers`` imports them all, so the registry it shows is complete.
"""
