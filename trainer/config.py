"""YAML in, typed dataclasses out: overrides, strict validation, and the resolved config as YAML.

A config is read with ``yaml.safe_load`` only, dotted ``key=value`` overrides are applied
(values parsed as YAML scalars), the ``imports:`` modules are imported so user code can
register components, and then every key is checked: unknown keys at any depth, wrong
types, unknown registry names and keyword arguments a component does not take are each
a ``ConfigError`` naming the dotted path and the closest valid names.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer import bounded
from trainer.errors import ConfigError
from trainer.hints import MAX_INT, check_kwargs, check_type


@dataclass
class Component:
    """A section that picks a registry entry by ``name``; its other keys are that entry's kwargs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.kwargs}


@dataclass
class DataConfig(Component):
    """``data:``: a dataset entry plus how it is batched."""

    batch_size: int = 64            # per process under DDP
    shuffle: bool = True            # reshuffle the training set every epoch (seeded)
    drop_last: bool = False         # drop the last, smaller training batch of each epoch
    num_workers: int = 0            # DataLoader worker processes

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "num_workers": self.num_workers, **self.kwargs}


@dataclass
class TrainConfig:
    """``train:``: when to stop and how each optimizer step is made."""

    max_epochs: int | None = 5          # stop after this many epochs (null: no limit)
    max_steps: int | None = None        # stop after this many optimizer steps (null: no limit)
    accumulate: int = 1                 # micro-batches per optimizer step (gradient accumulation)
    clip_grad_norm: float | None = None  # clip the total grad norm to this (null: no clipping)
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    precision: str | int = "32"         # 32 | bf16 | 16 (16 needs CUDA: autocast + GradScaler); kept as a str
    compile: bool = False               # torch.compile the model and the loss (twins included)
    val_every: int | None = None        # validate every N steps (null: at the end of each epoch)
    checkpoint_every: int | None = None  # also checkpoint every N steps (always at epoch end and at the end)
    keep_checkpoints: int = 3           # newest step_<N>.pt files kept (last.pt and best.pt are links to them)
    async_checkpoint: bool = True       # write checkpoints in the background (false: inside the step)
    monitor: str | None = None          # val/loss | val/accuracy | train/loss: kept as best.pt, used by patience
    monitor_mode: Literal["min", "max"] = "min"
    patience: int | None = None         # early stopping: stop after this many checks without improvement
    min_delta: float = 0.0              # an improvement smaller than this does not count
    skip_nonfinite: bool = False        # skip (and count) steps whose loss is NaN/inf instead of stopping


@dataclass
class LogConfig:
    """``log:``: where runs go and how often they are logged."""

    dir: str = "runs"                   # runs go to <dir>/<name>/version_<N>/
    every: int = 50                     # TensorBoard scalars and progress-bar loss every N steps
    progress: bool | None = None        # tqdm bar; null: only when stdout is a terminal
    histograms_every: int | None = None  # weight and grad histograms every N steps (null: never)
    graph: bool = False                 # write the model graph to TensorBoard


@dataclass
class CompareConfig:
    """``compare:``: native-vs-custom gradient comparison (``trainer compare``) and shadow mode (``trainer run``)."""

    batches: int = 1                    # batches `trainer compare` feeds both models
    rtol: float | None = None           # null: torch.testing.assert_close's default for the dtype
    atol: float | None = None           # null: likewise
    bisect: bool = True                 # on a mismatch, swap layers one at a time to name the culprit
    every: int | None = None            # shadow mode: compare each swapped layer every N training steps (null: off)
    fail: bool = False                  # shadow mode: stop the run (exit 1) at the first check outside tolerance


@dataclass
class Config:
    """A whole experiment. Built by ``load_config``; ``to_dict`` gives the resolved YAML form."""

    model: Component
    loss: Component
    optimizer: Component
    data: DataConfig
    name: str = "experiment"
    seed: int = 0
    imports: list[str] = field(default_factory=list)
    layers: dict[str, str] = field(default_factory=lambda: {"default": "native"})
    scheduler: Component | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    source: str | None = field(default=None, repr=False)  # the YAML file it came from

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ORDER:
            value = getattr(self, name)
            if isinstance(value, Component):
                value = value.to_dict()
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[name] = copy.deepcopy(value)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


ORDER = ("name", "seed", "imports", "model", "layers", "loss", "optimizer", "scheduler", "data", "train", "log",
         "compare")
SECTIONS = ("model", "loss", "optimizer", "scheduler", "data")
REQUIRED = ("model", "loss", "optimizer", "data")
PRECISIONS = ("32", "bf16", "16")
MONITORS = ("val/loss", "val/accuracy", "train/loss")
NULLABLE = ("train.max_epochs", "train.max_steps", "train.val_every", "train.checkpoint_every", "train.patience",
            "log.histograms_every", "compare.every")  # the counts whose null means "no limit" or "never"
MAX_NAME = 100  # characters: <name>-lockstep/version_<N> stays well inside a file name's 255 bytes


def load_config(source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Read, override, import, validate and resolve a config.

    Args:
        source: a YAML file path, or an already-parsed mapping.
        overrides: dotted ``key=value`` strings (``optimizer.lr=0.1``), values parsed as YAML.

    Returns:
        The resolved ``Config``: every component's defaults filled in.

    Raises:
        ConfigError: anything wrong with the file, an override or a value.
    """
    if isinstance(source, Mapping):
        bounded.check_size(dict(source))
        raw, path = copy.deepcopy(dict(source)), None
    else:
        path = Path(source)
        raw = read_yaml(path)
    for override in overrides:
        apply_override(raw, override)
    bounded.check_size(raw)  # the overrides together, too
    import_modules(raw.get("imports", []), path.parent if path else None)
    cfg = from_dict(raw)
    cfg.source = str(path) if path else None
    return cfg


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), "no such config file", suggestion="check the path; configs/ holds examples")
    if path.stat().st_size > bounded.MAX_BYTES:
        raise ConfigError(str(path), f"larger than the {bounded.MAX_BYTES} bytes a config may have",
                          suggestion="a config names its data by path; it does not hold it")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(str(path), "not a text file", suggestion="a config is a YAML text file") from None
    raw = bounded.parse(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), f"the top level must be a mapping, got {type(raw).__name__}",
                          suggestion="see configs/quickstart.yaml")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in the raw config, the value parsed as a YAML scalar or flow collection."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(key or override, f"bad override {override!r}",
                          suggestion="write overrides as dotted.key=value, e.g. optimizer.lr=0.1")
    try:
        value = bounded.parse(text, key, root=key) if text.strip() else None
    except ConfigError as e:
        if "invalid YAML" not in e.message:
            raise
        raise ConfigError(key, f"cannot parse the value {text!r}",
                          suggestion="values are YAML: 0.1, true, null, [64, 64], {name: relu}") from None
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is {child!r}, not a section, so {key} cannot be set",
                              suggestion=f"override {'.'.join(parts[: i + 1])} itself")
        node = child
    node[parts[-1]] = value


def import_modules(modules: Any, folder: Path | None = None) -> None:
    """Import user modules so their ``@register`` decorators run (from ``folder``, the config's, or the cwd)."""
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError("imports", f"expected a list of module names, got {modules!r}",
                          suggestion="e.g. imports: [my_layers]")
    for place in {str(Path.cwd()), str(folder.resolve()) if folder else None} - {None}:
        if place not in sys.path:
            sys.path.insert(0, place)
    if modules:  # a module may compute at import: the process's first parallel regions go on throwaway data first
        from trainer import threads
        threads.warm_up()
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"imports[{i}]", f"cannot import {name!r}: {e}",
                              suggestion="a module file next to the config or in the current directory, "
                                         "or an installed package") from None
        except ConfigError as e:  # a registration the registry refused (layers.register's RegistrationError)
            where = f"{name}: " if not e.path else f"{e.path}: "  # the user's file:line of the refused call
            raise ConfigError(f"imports[{i}]", where + e.message, suggestion=e.suggestion) from None
        except Exception as e:  # the module itself is broken (SyntaxError, a raise)
            where = f" ({Path(e.filename).name}, line {e.lineno})" if isinstance(e, SyntaxError) and e.filename else ""
            detail = (e.msg if isinstance(e, SyntaxError) else str(e)).strip().splitlines()
            raise ConfigError(f"imports[{i}]", f"importing {name!r} raised {type(e).__name__}{where}: "
                              f"{detail[0] if detail else ''}", suggestion=f"fix the module {name}") from None


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Validate a raw mapping into a resolved ``Config`` (no file, no overrides, no imports)."""
    from trainer import layers  # the registries import torch; keep `trainer config --help` light

    for key in raw:
        if key not in ORDER:
            raise ConfigError(str(key), "unknown key", choices=ORDER, given=str(key))
    for key in REQUIRED:
        if raw.get(key) is None:
            raise ConfigError(key, "missing section", suggestion=f"add `{key}: {{name: ...}}`; see configs/quickstart.yaml")
    values: dict[str, Any] = {}
    for key in ("name", "seed", "imports"):
        if key in raw:
            values[key] = check_type(raw[key], _hint(Config, key), key)
    for key in SECTIONS:
        if raw.get(key) is not None:
            values[key] = component(raw[key], key, DataConfig if key == "data" else Component)
    values["train"] = section(raw.get("train") or {}, TrainConfig, "train")
    values["log"] = section(raw.get("log") or {}, LogConfig, "log")
    values["compare"] = section(raw.get("compare") or {}, CompareConfig, "compare")
    mapping = raw.get("layers")
    values["layers"] = layers.check_mapping({"default": "native"} if mapping is None else mapping)
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks of values and their ranges that types alone cannot express."""
    t, d, log = cfg.train, cfg.data, cfg.log
    t.precision = str(t.precision)
    if t.precision not in PRECISIONS:
        raise ConfigError("train.precision", f"unknown precision {t.precision!r}", choices=PRECISIONS, given=t.precision)
    for path, value in [("train.max_epochs", t.max_epochs), ("train.max_steps", t.max_steps),
                        ("train.accumulate", t.accumulate), ("train.val_every", t.val_every),
                        ("train.checkpoint_every", t.checkpoint_every), ("data.batch_size", d.batch_size),
                        ("train.keep_checkpoints", t.keep_checkpoints), ("train.patience", t.patience),
                        ("log.every", log.every), ("log.histograms_every", log.histograms_every),
                        ("compare.batches", cfg.compare.batches), ("compare.every", cfg.compare.every)]:
        if value is not None and value < 1:
            raise ConfigError(path, f"must be at least 1, got {value}",
                              suggestion="use 1 or more, or null to turn it off" if path in NULLABLE else "use 1 or more")
    for path, tol in [("compare.rtol", cfg.compare.rtol), ("compare.atol", cfg.compare.atol)]:
        if tol is not None and not tol >= 0:
            raise ConfigError(path, f"must be 0 or more, got {tol}", suggestion="use null for the dtype's default")
    if t.monitor is not None and t.monitor not in MONITORS:
        raise ConfigError("train.monitor", f"unknown metric {t.monitor!r}", choices=MONITORS, given=t.monitor)
    if t.patience is not None and t.monitor is None:
        raise ConfigError("train.patience", "early stopping needs a metric to watch", suggestion="set train.monitor")
    if not t.min_delta >= 0:
        raise ConfigError("train.min_delta", f"must be 0 or more, got {t.min_delta}")
    if d.num_workers < 0:
        raise ConfigError("data.num_workers", f"must be 0 or more, got {d.num_workers}")
    if t.clip_grad_norm is not None and not t.clip_grad_norm > 0:
        raise ConfigError("train.clip_grad_norm", f"must be positive, got {t.clip_grad_norm}",
                          suggestion="use null for no clipping")
    if t.max_epochs is None and t.max_steps is None:
        raise ConfigError("train.max_steps", "both train.max_epochs and train.max_steps are null: the run would never end",
                          suggestion="set one of them")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:") and t.device[5:].isdigit()):
        raise ConfigError("train.device", f"unknown device {t.device!r}", choices=("auto", "cpu", "cuda", "cuda:0"),
                          given=t.device)
    if not 0 <= cfg.seed <= MAX_INT:
        raise ConfigError("seed", f"must be in [0, 2**63 - 1], got {cfg.seed}")
    if (not cfg.name or "/" in cfg.name or "\\" in cfg.name or cfg.name in (".", "..") or len(cfg.name) > MAX_NAME
            or not cfg.name.isprintable()):
        raise ConfigError("name", f"{cfg.name[:MAX_NAME]!r}{'...' if len(cfg.name) > MAX_NAME else ''} cannot name "
                          f"a run folder", suggestion=f"use up to {MAX_NAME} letters, digits, - and _")
    log.dir = os.path.expanduser(log.dir)
    check_run_folder(log.dir)


def check_run_folder(folder: str) -> None:
    """``log.dir`` must be (or be creatable as) a folder: its nearest existing ancestor is a folder."""
    if "\0" in folder:
        raise ConfigError("log.dir", f"{folder!r} holds a NUL character", suggestion="point log.dir at a folder")
    try:
        place = Path(folder).absolute()
        while not place.exists() and place != place.parent:
            place = place.parent
        is_dir = place.is_dir()
    except (OSError, ValueError) as e:  # a NUL in the path, a name too long
        raise ConfigError("log.dir", f"cannot be a folder: {e}", suggestion="point log.dir at a folder") from None
    if not is_dir:
        raise ConfigError("log.dir", f"{place} is a file, not a folder", suggestion="point log.dir at a folder")


def section(raw: Any, cls: type, path: str) -> Any:
    """A plain dataclass section: every key known, every value of its field's type."""
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"expected a mapping, got {raw!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"{path}.{key}", "unknown key", choices=names, given=str(key))
        values[key] = check_type(value, _hint(cls, key), f"{path}.{key}")
    return cls(**values)


def component(raw: Any, path: str, cls: type[Component]) -> Component:
    """A ``{name: ..., **kwargs}`` section checked against its registry entry's signature, defaults filled in."""
    from trainer import components  # the registries import torch; keep `trainer config --help` light

    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping) or "name" not in raw:
        raise ConfigError(path, f"expected a mapping with a name, got {raw!r}", suggestion=f"e.g. {path}: {{name: ...}}")
    raw = dict(raw)
    own = {f.name for f in dataclasses.fields(cls)} - {"name", "kwargs"}
    fixed = {k: check_type(raw.pop(k), _hint(cls, k), f"{path}.{k}") for k in list(raw) if k in own}
    name = check_type(raw.pop("name"), str, f"{path}.name")
    entry = components.registry(path).get(name, f"{path}.name")
    if path == "loss" and _is_loss_itself(entry, raw):
        raise ConfigError("loss.name", f"{name!r} is registered as the loss function itself; a loss entry is called "
                          "with the config's keys and returns the loss", suggestion=f"register a factory: "
                          f"@register({name!r}) def make(): return {getattr(entry, '__name__', 'my_loss')}")
    kwargs = check_kwargs(entry, raw, path, skip=components.INJECTED.get(path, ()), extra=sorted(own))
    return cls(name=name, kwargs=kwargs, **fixed)


def _is_loss_itself(entry: Any, given: Mapping[str, Any]) -> bool:
    """A plain function of two required arguments the config does not give: the loss itself, not its factory."""
    if inspect.isclass(entry) or not callable(entry):
        return False
    required = [p for p in inspect.signature(entry).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 2 and not any(p.name in given for p in required)


def _hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]
