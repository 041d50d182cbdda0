"""The package's layers depend one way, and the CLI answers --help, --version and bad arguments without torch.

Every import statement in ``trainer/`` counts, at module level or inside a function (an import
inside a function hides a cycle; it does not remove it), and so does a string naming a
``trainer`` module (what ``importlib.import_module`` is given).
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trainer"
MODULE_NAME = re.compile(r"trainer(\.\w+)+")

# Each module's layer, lowest first; a module may import its own layer or lower ones, never higher.
LAYERS = [
    ("foundations", ["trainer.errors", "trainer.bounded", "trainer.hints", "trainer.threads", "trainer.disk"]),
    ("twins", ["trainer.twins"]),
    ("config and registries", ["trainer.registry", "trainer.layers", "trainer.models", "trainer.losses",
                               "trainer.optimizers", "trainer.schedulers", "trainer.datasets", "trainer.config",
                               "trainer.components"]),
    ("builder", ["trainer.build", "trainer.data", "trainer.distributed", "trainer.checkpoint", "trainer.logs",
                 "trainer.console", "trainer.monitor", "trainer.signals", "trainer.targets", "trainer.snapshot"]),
    ("trainer", ["trainer.loop", "trainer.callbacks", "trainer.resume", "trainer.stops", "trainer.measure"]),
    ("checking tools", ["trainer.check"]),
    ("command line and package", ["trainer.cli", "trainer.__main__", "trainer"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The ``trainer`` modules ``name`` imports anywhere in its file (``from trainer import x``: ``trainer.x``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .y import z
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.fullmatch(node.value):
            found.add(node.value)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def layer(name: str) -> int:
    """The index in LAYERS of the longest prefix naming ``name``'s layer."""
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if name == p or name.startswith(p + ".")), default=None)
    assert best is not None, f"{name} belongs to no layer: add it to LAYERS"
    return best[1]


def test_the_graph_sees_imports_inside_functions():
    assert "trainer.check.compare" in GRAPH["trainer.cli"]  # imported inside cmd_compare only
    assert "trainer.components" in GRAPH["trainer.config"]  # likewise, inside component()
    assert "trainer.loop" in GRAPH["trainer"]  # named by a string for importlib


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_every_module_imports_only_its_own_layer_or_lower():
    upward = [f"{name} ({LAYERS[layer(name)][0]}) imports {dep} ({LAYERS[layer(dep)][0]})"
              for name, deps in GRAPH.items() for dep in deps if layer(dep) > layer(name)]
    assert not upward, "\n".join(upward)


def test_only_the_cli_and_the_package_import_the_checking_tools():
    def tool(name: str) -> bool:
        return layer(name) == layer("trainer.check")

    users = {name for name, deps in GRAPH.items() for dep in deps if tool(dep) and not tool(name)}
    assert users <= {"trainer", "trainer.cli"}, users


def test_twins_import_only_twins_and_errors():
    for name, deps in GRAPH.items():
        if name.startswith("trainer.twins"):
            outside = {d for d in deps if not d.startswith("trainer.twins") and d != "trainer.errors"}
            assert not outside, f"{name} imports {outside}"


def test_the_loop_is_built_by_the_builder():
    assert "trainer.build" in GRAPH["trainer.loop"]
    assert {"trainer.build", "trainer.loop"} & GRAPH["trainer.check.compare"] == {"trainer.build"}


@pytest.mark.parametrize("args,code", [(["--help"], 0), (["--version"], 0), (["run", "--help"], 0),
                                       (["bogus"], 2), (["run"], 2), (["gradcheck", "--device", "tpu"], 2)])
def test_cli_answers_help_version_and_argument_errors_without_torch(args, code):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainer", *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == code, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "trainer.cli" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "torch was imported"
    if args == ["--version"]:
        from importlib.metadata import version
        assert proc.stdout.strip() == f"trainer {version('trainer')}"
    if code == 2:
        errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
        assert len(errors) == 1 and errors[0].startswith("error: "), errors
