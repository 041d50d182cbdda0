"""The layer registry: each name pairs a native nn.Module class with its custom twin, and swap() switches them.

A twin is a subclass of the native class whose ``forward`` calls a hand-written
``torch.autograd.Function`` (``trainer/twins/``). Swapping changes an instance's class in
place, so parameters, buffers, hooks and the optimizer's references survive, and swapping
back is exact. The built-in twins are registered at the end of this module.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from trainer.errors import ConfigError
from trainer.twins import activations as act
from trainer.twins import cases, dense, dropout, losses, norm, softmax
from trainer.twins.cases import Case

__all__ = ["IMPLS", "Case", "LayerSpec", "RegistrationError", "check_mapping", "get", "impl_of", "names", "pair_of",
           "register", "specs", "swap"]

IMPLS = ("native", "custom")


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
    builtin: bool = False           # one of trainer's own twins (registered at the end of this module)

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


# --- the built-in twins -----------------------------------------------------------------

register("relu", native=nn.ReLU, custom=act.CustomReLU, cases=cases.relu, saves="y (output)")
register("leaky_relu", native=nn.LeakyReLU, custom=act.CustomLeakyReLU, cases=cases.leaky_relu,
         saves="y (output); x when negative_slope < 0")
register("elu", native=nn.ELU, custom=act.CustomELU, cases=cases.elu, saves="y (output); x when alpha < 0")
register("gelu", native=nn.GELU, custom=act.CustomGELU, cases=cases.gelu, saves="x (input)")
register("silu", native=nn.SiLU, custom=act.CustomSiLU, cases=cases.silu, saves="x (input)")
register("mish", native=nn.Mish, custom=act.CustomMish, cases=cases.mish, saves="x (input)")
register("softplus", native=nn.Softplus, custom=act.CustomSoftplus, cases=cases.softplus, saves="x (input)")
register("sigmoid", native=nn.Sigmoid, custom=act.CustomSigmoid, cases=cases.sigmoid, saves="y (output)")
register("tanh", native=nn.Tanh, custom=act.CustomTanh, cases=cases.tanh, saves="y (output)")
register("hardsigmoid", native=nn.Hardsigmoid, custom=act.CustomHardsigmoid, cases=cases.hardsigmoid,
         saves="x (input)")
register("hardswish", native=nn.Hardswish, custom=act.CustomHardswish, cases=cases.hardswish, saves="x (input)")
register("linear", native=nn.Linear, custom=dense.CustomLinear, cases=cases.linear, reduction=True,
         saves="x if dW is needed, W if dx is needed")
register("conv2d", native=nn.Conv2d, custom=dense.CustomConv2d, cases=cases.conv2d, reduction=True,
         saves="x if dW is needed, W if dx is needed")
register("dropout", native=nn.Dropout, custom=dropout.CustomDropout, cases=cases.dropout,
         saves="bool mask (1 B/elem); nothing if p in {0, 1} or eval")
register("embedding", native=nn.Embedding, custom=dense.CustomEmbedding, cases=cases.embedding, saves="indices")
register("layer_norm", native=nn.LayerNorm, custom=norm.CustomLayerNorm, cases=cases.layer_norm, reduction=True,
         saves="x, mean, rstd (as native; statistics in float32)")
# vmap of a training-mode BatchNorm (native too) needs its buffers passed in (functional_call, as
# trainer.check.audit.as_function does): torch.func refuses to mutate a captured tensor
register("batch_norm", native=(nn.BatchNorm1d, nn.BatchNorm2d), custom=(norm.CustomBatchNorm1d, norm.CustomBatchNorm2d),
         cases=cases.batch_norm, reduction=True,
         saves="x, batch mean and var (as native; statistics in float32); eval: x only for dγ")
register("softmax", native=nn.Softmax, custom=softmax.CustomSoftmax, cases=cases.softmax, reduction=True,
         saves="y (output)")
register("log_softmax", native=nn.LogSoftmax, custom=softmax.CustomLogSoftmax, cases=cases.log_softmax,
         reduction=True, saves="y (output)")
register("mse", native=nn.MSELoss, custom=losses.CustomMSELoss, cases=cases.mse, reduction=True,
         saves="x, t (inputs)")
register("l1", native=nn.L1Loss, custom=losses.CustomL1Loss, cases=cases.l1, reduction=True,
         saves="sign(x − t) (int8, an extra output)")
register("huber", native=nn.HuberLoss, custom=losses.CustomHuberLoss, cases=cases.huber, reduction=True,
         saves="x, t (inputs)")
register("cross_entropy", native=nn.CrossEntropyLoss, custom=losses.CustomCrossEntropyLoss, cases=cases.cross_entropy,
         reduction=True, saves="logits, target, weight (as many bytes as native's log p)")
register("bce_with_logits", native=nn.BCEWithLogitsLoss, custom=losses.CustomBCEWithLogitsLoss,
         cases=cases.bce_with_logits, reduction=True, saves="x, t (inputs)")
