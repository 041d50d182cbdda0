"""The layer registry itself: each name pairs a native nn.Module class with its custom twin, and swap() switches them.

A custom twin is a subclass of the native class that overrides ``forward`` to call a
hand-written ``torch.autograd.Function``. Swapping changes an instance's class in place,
so parameters, buffers, hooks, attributes and the optimizer's references all survive,
and swapping back is exact.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.errors import ConfigError

IMPLS = ("native", "custom")


@dataclass(frozen=True)
class Case:
    """One input configuration on which a twin is checked against its native layer.

    Attributes:
        id: short label, e.g. ``"gelu-tanh"`` or ``"relu-zeros"``.
        module: builds the *native* module (the checks cast it and swap a copy).
        inputs: builds the forward arguments in float64 from a generator; floating
            tensors are cast to the dtype under test and get ``requires_grad``.
        gradcheck: False for cases compared with native only (kinks, thresholds, where
            finite differences are meaningless, or inputs too large to gradcheck quickly).
        train: run the module in train (True) or eval (False) mode.
        edges: an elementwise layer's edge values (infinities, NaN, kinks): compared with
            native only where native agrees with itself element by element (its vectorized
            and scalar CPU loops may differ there), elsewhere with one of native's answers.
    """

    id: str
    module: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple[torch.Tensor, ...]]
    gradcheck: bool = True
    train: bool = True
    edges: bool = False


@dataclass(frozen=True)
class LayerSpec:
    """A registry entry: the native/custom class pairs under one name, and what is known of the twin."""

    name: str
    pairs: tuple[tuple[type[nn.Module], type[nn.Module]], ...]
    cases: Callable[[], list[Case]] = field(default=lambda: [])
    saves: str = ""                 # what the twin's Function saves, in words ("y (output)")
    double_backward: bool = True    # False: backward is @once_differentiable
    vmap: bool = True               # torch.func.vmap/jacrev work (generate_vmap_rule or a vmap staticmethod)
    compile: bool = True            # torch.compile(fullgraph=True) traces it without a graph break
    reduction: bool = False         # a reduction (norm, softmax, loss, matmul): looser float tolerances

    @property
    def native(self) -> type[nn.Module]:
        return self.pairs[0][0]

    @property
    def custom(self) -> type[nn.Module]:
        return self.pairs[0][1]


_SPECS: dict[str, LayerSpec] = {}


def register(name: str, *, native: type[nn.Module] | tuple[type[nn.Module], ...],
             custom: type[nn.Module] | tuple[type[nn.Module], ...], **info) -> LayerSpec:
    """Register a native layer class and its custom twin under ``name``.

    Args:
        name: registry key, snake_case like torch's (``layer_norm``).
        native: the native ``nn.Module`` class (or a tuple, e.g. BatchNorm1d and BatchNorm2d).
        custom: its twin (or a tuple, one per native class): a subclass that overrides
            ``forward`` only and defines no ``__init__``, so swapping is a class change.
        **info: further ``LayerSpec`` fields (``cases``, ``saves``, ``double_backward``, ...).

    Raises:
        ValueError: the name is taken, a native class is already registered, or a twin
            is not a plain subclass of its native class.
    """
    natives = native if isinstance(native, tuple) else (native,)
    customs = custom if isinstance(custom, tuple) else (custom,)
    if name in _SPECS:
        raise ValueError(f"layer {name!r} is already registered")
    if len(natives) != len(customs):
        raise ValueError(f"layer {name!r}: {len(natives)} native classes but {len(customs)} custom ones")
    taken = {n: s.name for s in _SPECS.values() for n, _ in s.pairs}
    for n, c in zip(natives, customs):
        if n in taken:
            raise ValueError(f"layer {name!r}: {n.__name__} is already registered as {taken[n]!r}")
        if not (isinstance(c, type) and issubclass(c, n)) or c is n:
            raise ValueError(f"layer {name!r}: the custom class must be a subclass of {n.__name__}")
        if "__init__" in vars(c):
            raise ValueError(f"layer {name!r}: {c.__name__} must not define __init__ (a twin adds no state)")
    spec = LayerSpec(name=name, pairs=tuple(zip(natives, customs)), **info)
    _SPECS[name] = spec
    return spec


def get(name: str, path: str = "layers") -> LayerSpec:
    """The spec called ``name``; a ``ConfigError`` with the closest names if none."""
    if name not in _SPECS:
        raise ConfigError(path, f"unknown layer {name!r}", choices=_SPECS, given=str(name),
                          hint="a layer of your own must be registered by a module listed under `imports:`")
    return _SPECS[name]


def names() -> list[str]:
    return sorted(_SPECS)


def specs() -> list[LayerSpec]:
    return [_SPECS[n] for n in names()]


def check_mapping(mapping: Mapping[str, str], path: str = "layers") -> dict[str, str]:
    """Validate a ``{default: native|custom, <layer>: native|custom}`` mapping."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(path, f"expected a mapping like {{default: native, relu: custom}}, got {mapping!r}")
    for key, impl in mapping.items():
        if key != "default":
            get(key, f"{path}.{key}")
        if impl not in IMPLS:
            raise ConfigError(f"{path}.{key}", f"unknown implementation {impl!r}", choices=IMPLS, given=str(impl))
    return dict(mapping)


def swap(model: nn.Module, mapping: Mapping[str, str]) -> nn.Module:
    """Switch registry layers inside ``model`` (itself included) to the implementations in ``mapping``.

    Only instances of exactly a registered native class (or its twin) change; a layer
    with no entry and no ``default`` in ``mapping`` is left as it is. The change is in
    place and keeps every parameter, buffer, hook and attribute, so it is safe after
    the optimizer was built and is undone by swapping back.

    Args:
        model: any module, registered or the user's own.
        mapping: ``{"default": "native"|"custom", "<layer>": "native"|"custom"}``.

    Returns:
        ``model``, for chaining.
    """
    mapping = check_mapping(mapping)
    to_class: dict[type[nn.Module], type[nn.Module]] = {}
    for spec in _SPECS.values():
        impl = mapping.get(spec.name, mapping.get("default"))
        for native, custom in spec.pairs:
            if impl == "custom":
                to_class[native] = custom
            elif impl == "native":
                to_class[custom] = native
    for module in model.modules():
        new = to_class.get(type(module))
        if new is not None:
            module.__class__ = new
    return model


def pair_of(module: nn.Module) -> tuple[str, type[nn.Module], type[nn.Module]] | None:
    """``(layer name, native class, custom class)`` for a registry layer instance, else None."""
    for spec in _SPECS.values():
        for native, custom in spec.pairs:
            if type(module) in (native, custom):
                return spec.name, native, custom
    return None


def impl_of(module: nn.Module) -> tuple[str, str] | None:
    """``(layer name, "native"|"custom")`` for a registry layer instance, else None."""
    found = pair_of(module)
    return None if found is None else (found[0], "native" if type(module) is found[1] else "custom")
