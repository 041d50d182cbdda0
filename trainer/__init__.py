"""trainer: a small config-driven PyTorch trainer whose layers have hand-written autograd.Function twins."""
from trainer import layers

__all__ = ["layers"]
