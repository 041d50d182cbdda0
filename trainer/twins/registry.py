"""The layer registry itself: each name pairs a native nn.Module class with its custom twin, and swap() switches them.

A custom twin is a subclass of the native class that overrides ``forward`` to call a
hand-written ``torch.autograd.Function``. Swapping changes an instance's class in place,
so parameters, buffers, hooks, attributes and the optimizer's references all survive,
and swapping back is exact.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

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
    # What the twin supports, as declared. A built-in's flags default to True (the test suite
    # checks each of them); a user twin's default to None, "not declared": `trainer layers`
    # then measures them, and gradcheck skips batched-grad checks.
    double_backward: bool | None = None  # False: backward is @once_differentiable
    vmap: bool | None = None             # torch.func.vmap/jacrev work (generate_vmap_rule or a vmap staticmethod)
    compile: bool | None = None          # torch.compile(fullgraph=True) traces it without a graph break
    reduction: bool = False         # a reduction (norm, softmax, loss, matmul): looser float tolerances
    origin: str = ""                # where it was registered: a built-in's module, or a user's file:line
    builtin: bool = False           # one of trainer's own twins (registered by trainer.twins.*)

    @property
    def native(self) -> type[nn.Module]:
        return self.pairs[0][0]

    @property
    def custom(self) -> type[nn.Module]:
        return self.pairs[0][1]


_SPECS: dict[str, LayerSpec] = {}


class RegistrationError(ConfigError, ValueError):
    """A layer registration the registry refuses; the CLI prints it as one ``error:`` line (exit 2)."""


FLAGS = ("double_backward", "vmap", "compile")


def register(name: str, *, native: type[nn.Module] | tuple[type[nn.Module], ...],
             custom: type[nn.Module] | tuple[type[nn.Module], ...], replace: bool = False,
             **info) -> LayerSpec:
    """Register a native layer class and its custom twin under ``name``.

    A native class has one twin at a time. To use your own twin of a layer the registry
    already covers, register it under that layer's name with ``replace=True``
    (``register("silu", native=nn.SiLU, custom=MySiLU, replace=True)``): configs then
    swap to yours with ``layers: {silu: custom}``.

    Args:
        name: registry key, snake_case like torch's (``layer_norm``).
        native: the native ``nn.Module`` class (or a tuple, e.g. BatchNorm1d and BatchNorm2d).
        custom: its twin (or a tuple, one per native class): a subclass that overrides
            ``forward`` only and defines no ``__init__``, so swapping is a class change.
        replace: replace the entry already registered under ``name``, if any.
        **info: further ``LayerSpec`` fields: ``cases`` (a list of ``Case``, or a function
            returning one), ``saves``, ``double_backward``, ``vmap``, ``compile``, ``reduction``.

    Raises:
        RegistrationError: (a ``ValueError``) the name is taken and ``replace`` is False, a
            native class already has a twin under another name, or a twin is not a plain
            subclass of its native class.
    """
    natives = native if isinstance(native, tuple) else (native,)
    customs = custom if isinstance(custom, tuple) else (custom,)
    builtin = all(getattr(c, "__module__", "").startswith("trainer.") for c in customs)
    if not builtin:  # the built-ins register first, so a clash is always reported at the user's call
        import trainer.layers  # noqa: F401
    where = builtin and customs[0].__module__ or _caller()

    def refuse(message: str, suggestion: str) -> RegistrationError:
        return RegistrationError(where, f"layer {name!r}: {message}", suggestion=suggestion)

    call = f"layers.register({name!r}, native={_names(natives)}, custom={_names(customs)}"
    if name in _SPECS and not replace:
        raise refuse(f"the name is taken by {_describe(_SPECS[name])}",
                     f"to use yours instead, pass replace=True: {call}, replace=True); or choose another name")
    if len(natives) != len(customs):
        raise refuse(f"{len(natives)} native classes but {len(customs)} custom ones", "give one twin per native class")
    taken = {n: s for s in _SPECS.values() if s.name != name for n, _ in s.pairs}
    for n, c in zip(natives, customs):
        if n in taken:
            other = taken[n]
            raise refuse(f"{n.__name__} already has a twin: layer {other.name!r}, {_describe(other)}",
                         f"a native class has one twin at a time; to use yours, register it under that name "
                         f"with replace=True: layers.register({other.name!r}, native={n.__name__}, "
                         f"custom={getattr(c, '__name__', c)}, replace=True)")
        if not (isinstance(c, type) and issubclass(c, n)) or c is n:
            raise refuse(f"the custom class must be a subclass of {n.__name__}",
                         f"write class {getattr(c, '__name__', 'MyTwin')}({n.__name__}) with a forward of its own")
        if "__init__" in vars(c):
            raise refuse(f"{c.__name__} must not define __init__ (a twin adds no state)",
                         "remove __init__; swapping changes an instance's class, so the native one's state is used")
    cases = info.pop("cases", None)
    if cases is not None and not callable(cases):
        cases = (lambda given: lambda: list(given))(tuple(cases))
    if builtin:
        info = {flag: True for flag in FLAGS} | info
    spec = LayerSpec(name=name, pairs=tuple(zip(natives, customs)), origin=where, builtin=builtin,
                     **({"cases": cases} if cases is not None else {}), **info)
    _SPECS[name] = spec
    return spec


def _names(classes: tuple[type, ...]) -> str:
    names = [getattr(c, "__name__", repr(c)) for c in classes]
    return names[0] if len(names) == 1 else f"({', '.join(names)})"


def _describe(spec: LayerSpec) -> str:
    customs = ", ".join(c.__name__ for _, c in spec.pairs)
    return f"the built-in twin {customs}" if spec.builtin else f"the twin {customs} registered at {spec.origin}"


def _caller() -> str:
    """``file.py:line`` of the user's call to ``register`` (the first frame outside this file)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return "?" if frame is None else f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


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
