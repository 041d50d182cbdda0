"""Bounded YAML: a config costs at most a fixed budget to read, whatever it holds.

``parse`` scans the YAML event stream (PyYAML's parser is iterative) before anything is
built, so a nesting depth beyond ``MAX_DEPTH`` and a key given twice are ``ConfigError``s
naming the key path, never a ``RecursionError`` or a silently kept last value. ``check_size``
then walks the built value with aliases expanded, stopping as soon as the budget is spent,
so an alias "bomb" is refused in O(budget) time and memory.
"""
from __future__ import annotations

from typing import Any

import yaml

from trainer.errors import ConfigError

MAX_BYTES = 1 << 20        # a config file or override: 1 MiB of text
MAX_DEPTH = 32             # nested mappings/lists
MAX_VALUES = 10_000        # values in the whole config, aliases expanded
MAX_TEXT = 4096            # characters in one string (a path, a name)
MAX_TOTAL_TEXT = 1 << 20   # characters in all strings together, aliases expanded

NODE_STARTS = (yaml.ScalarEvent, yaml.AliasEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse(text: str, where: str, root: str = "") -> Any:
    """``yaml.safe_load(text)`` within the bounds above.

    Args:
        text: the YAML text.
        where: what the text is (a file path, an override's key), for messages.
        root: the config path the text's top level sits at (an override's key), for messages.

    Raises:
        ConfigError: invalid YAML, too large, too deep, or a duplicate key.
    """
    if len(text) > MAX_BYTES:
        raise ConfigError(where, f"{len(text)} characters of YAML, more than the {MAX_BYTES} a config may have",
                          suggestion="a config names its data by path; it does not hold it")
    try:
        _scan(text, where, root)
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(where, f"invalid YAML{at}: {problem}",
                          suggestion="only plain YAML is read (yaml.safe_load): no python tags") from None
    check_size(value, root)
    return value


def _scan(text: str, where: str, root: str) -> None:
    """Depth and duplicate keys, from the event stream: no recursion, nothing built."""
    stack: list[dict[str, Any]] = []  # one frame per open mapping/sequence
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            stack.pop()
            continue
        if not isinstance(event, NODE_STARTS):
            continue
        path = root
        if stack:
            parent = stack[-1]
            if parent["kind"] == "seq":
                path = f"{parent['path']}[{parent['index']}]"
                parent["index"] += 1
            elif parent["expect_key"]:
                key = event.value if isinstance(event, yaml.ScalarEvent) else "?"
                if isinstance(event, yaml.ScalarEvent) and key in parent["keys"]:
                    raise ConfigError(_join(parent["path"], key) or where, "key given twice",
                                      suggestion="keep one; YAML would silently use the last")
                parent["keys"].add(key)
                parent["key"], parent["expect_key"] = key, False
                path = parent["path"]
            else:
                path = _join(parent["path"], str(parent["key"]))
                parent["expect_key"] = True
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) >= MAX_DEPTH:
                raise ConfigError(path or where, f"nested deeper than {MAX_DEPTH} levels",
                                  suggestion="a config is a few levels deep; flatten this value")
            kind = "map" if isinstance(event, yaml.MappingStartEvent) else "seq"
            stack.append({"kind": kind, "path": path, "index": 0, "keys": set(), "key": None, "expect_key": True})


def check_size(value: Any, path: str = "") -> None:
    """Refuse a value deeper, larger or longer than the bounds, counting shared (aliased) parts each time.

    Iterative, and it stops at the first bound crossed, so a self-referencing or
    exponentially aliased value costs at most ``MAX_VALUES`` steps.
    """
    todo: list[tuple[Any, str, int]] = [(value, path, 0)]
    values = text = 0
    while todo:
        item, where, depth = todo.pop()
        values += 1
        if values > MAX_VALUES:
            raise ConfigError(path or "config", f"holds more than {MAX_VALUES} values with YAML aliases expanded "
                              f"(counting stopped at {where})",
                              suggestion="a config names its data by path; it does not hold it")
        if depth > MAX_DEPTH:
            raise ConfigError(where, f"nested deeper than {MAX_DEPTH} levels",
                              suggestion="a config is a few levels deep; flatten this value")
        if isinstance(item, str):
            if len(item) > MAX_TEXT:
                raise ConfigError(where, f"a string of {len(item)} characters, more than {MAX_TEXT}",
                                  suggestion="a config names its data by path; it does not hold it")
            text += len(item)
            if text > MAX_TOTAL_TEXT:
                raise ConfigError(path or "config", f"holds more than {MAX_TOTAL_TEXT} characters of text with YAML "
                                  f"aliases expanded (counting stopped at {where})",
                                  suggestion="a config names its data by path; it does not hold it")
        elif isinstance(item, dict):
            todo.extend((v, _join(where, str(k)), depth + 1) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            todo.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(item))
