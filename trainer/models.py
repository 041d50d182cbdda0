"""The model registry and the built-in models: linear, mlp, cnn."""
from __future__ import annotations

from torch import nn

from trainer import layers
from trainer.errors import ConfigError
from trainer.registry import Registry

REGISTRY: Registry = Registry("model")
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names

ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "silu", "mish", "softplus", "sigmoid", "tanh",
               "hardsigmoid", "hardswish")


def activation_module(name: str) -> nn.Module:
    """A fresh native activation module from the layer registry, by name (``relu``)."""
    if name not in layers.names():
        raise ConfigError("activation", f"unknown activation {name!r}", choices=ACTIVATIONS, given=name,
                          hint="any layer-registry name whose module takes no arguments works")
    try:
        return layers.get(name).native()
    except TypeError:
        raise ConfigError("activation", f"layer {name!r} needs constructor arguments, so it is no activation",
                          choices=ACTIVATIONS, given=name) from None


@register("linear")
def linear(in_features: int = 10, out_features: int = 1, bias: bool = True) -> nn.Module:
    """One ``nn.Linear``: the seed task's model."""
    return nn.Linear(in_features, out_features, bias=bias)


@register("mlp")
def mlp(in_features: int, out_features: int, hidden: list[int] = (64, 64), activation: str = "relu",
        dropout: float = 0.0, layer_norm: bool = False, bias: bool = True) -> nn.Module:
    """Linear -> [LayerNorm] -> activation -> [Dropout], once per hidden width, then a Linear.

    Args:
        in_features: input width.
        out_features: output width (1 for regression, the class count for classification).
        hidden: widths of the hidden layers.
        activation: a layer-registry activation name (``relu``, ``gelu``, ``silu``, ...).
        dropout: dropout probability after each activation (0: none).
        layer_norm: a LayerNorm after each hidden Linear.
        bias: Linear layers with bias.
    """
    if not 0.0 <= dropout <= 1.0:
        raise ConfigError("dropout", f"must be in [0, 1], got {dropout}")
    mods: list[nn.Module] = []
    width = in_features
    for h in hidden:
        mods.append(nn.Linear(width, h, bias=bias))
        if layer_norm:
            mods.append(nn.LayerNorm(h))
        mods.append(activation_module(activation))
        if dropout:
            mods.append(nn.Dropout(dropout))
        width = h
    mods.append(nn.Linear(width, out_features, bias=bias))
    return nn.Sequential(*mods)


@register("cnn")
def cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 8, channels: list[int] = (16, 32),
        activation: str = "relu", batch_norm: bool = True, dropout: float = 0.0) -> nn.Module:
    """A small conv net for image-shaped input ``(N, in_channels, image_size, image_size)``.

    Each stage is Conv2d(3x3, padding 1) -> [BatchNorm2d] -> activation -> MaxPool2d(2);
    then Flatten -> [Dropout] -> Linear to ``num_classes``.
    """
    if image_size >> len(channels) < 1:
        raise ConfigError("channels", f"{len(channels)} pooling stages shrink a {image_size}px image to nothing",
                          suggestion="use fewer stages or a larger image_size")
    mods: list[nn.Module] = []
    width, size = in_channels, image_size
    for c in channels:
        mods += [nn.Conv2d(width, c, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            mods.append(nn.BatchNorm2d(c))
        mods += [activation_module(activation), nn.MaxPool2d(2)]
        width, size = c, size // 2
    mods.append(nn.Flatten())
    if dropout:
        mods.append(nn.Dropout(dropout))
    mods.append(nn.Linear(width * size * size, num_classes))
    return nn.Sequential(*mods)

