"""Config values against type hints, and a component's keyword arguments against its signature.

``check_type`` accepts a value that fits its hint (an int where a float is asked, and PyYAML's
``1e-3`` string as a number) and refuses anything else, infinities and 64-bit overflows included,
with a ``ConfigError`` naming the dotted path; ``check_kwargs`` does the same for each argument a
registry entry takes, refusing unknown keys and filling in plain defaults.
"""
from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from trainer.errors import ConfigError

MAX_INT = 2**63 - 1  # torch, numpy and len() take at most 64-bit integers


def check_kwargs(fn: Any, kwargs: Mapping[str, Any], path: str, skip: Sequence[str] = (),
                 extra: Sequence[str] = ()) -> dict[str, Any]:
    """Check ``kwargs`` against ``fn``'s signature and annotations; return them with defaults filled in."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # unresolvable annotations in user code: fall back to unchecked values
        hints = {}
    params = {n: p for n, p in sig.parameters.items()
              if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    out = {}
    for key, value in kwargs.items():
        if key not in params and not takes_any:
            raise ConfigError(f"{path}.{key}", f"unknown key for {path} {getattr(fn, '__name__', fn)!r}",
                              choices=[*params, *extra, "name"], given=str(key))
        out[key] = check_type(value, hints.get(key, Any), f"{path}.{key}")
    for name, p in params.items():
        if name in out:
            continue
        if p.default is inspect.Parameter.empty:
            raise ConfigError(f"{path}.{name}", "missing required key",
                              suggestion=f"set {path}.{name}" + (f" ({_describe(hints[name])})" if name in hints else ""))
        if _plain(p.default):
            out[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return out


def check_type(value: Any, hint: Any, path: str) -> Any:
    """``value`` if it fits ``hint`` (int -> float and "1e-3" -> float allowed), else a ConfigError."""
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return check_type(value, option, path)
            except ConfigError as e:
                errors.append(e)
        for e in errors:  # the right type but out of range (inf, 2**70): that is the message to give
            if e.message.startswith("must be"):
                raise e
        raise ConfigError(path, f"expected {_describe(hint)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(path, f"unknown value {value!r}", choices=[str(a) for a in args], given=str(value))
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:  # torch, numpy and len() take at most 64-bit integers
                raise ConfigError(path, f"must be at most {MAX_INT} in size, got {value}")
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf
        elif isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .inf, 1e999, .nan: no option means anything with them
                raise ConfigError(path, f"must be a finite number, got {value}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple, Sequence) or hint in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return [check_type(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin in (dict, Mapping) or hint is dict:
        if isinstance(value, Mapping):
            vt = args[1] if len(args) == 2 else Any
            return {k: check_type(v, vt, f"{path}.{k}") for k, v in value.items()}
    else:
        return value  # a type we do not model (a tensor, a callable): the component checks it
    raise ConfigError(path, f"expected {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in args)
    if typing.get_origin(hint) in (list, tuple, Sequence):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if args:
        return " or ".join(_describe(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def _plain(value: Any) -> bool:
    """A default simple enough to show in the resolved YAML."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_plain(v) for v in value)
