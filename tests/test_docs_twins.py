"""docs/twins.md runs as written: its files are written, its Python and shell blocks run in order in an
empty folder (the shell ones with this venv's `trainer`), and each output block shown is what they print."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "twins.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.S | re.M)
# digits that vary by machine: timings, speeds and float digits (the table's columns shift with them)
VARIES = re.compile(r"\d+ ms|\d*\.\d+(e[-+]?\d+)?|\d+e[-+]?\d+|(?<=samples/s=)\d+")


def blocks(text: str) -> list[tuple[str, dict[str, str], str]]:
    """``(language, options, body)`` of each fenced block; options like ``file=x.py append run exit=1``."""
    out = []
    for lang, info, body in BLOCK.findall(text):
        opts = dict(o.partition("=")[::2] for o in info.split())
        out.append((lang, opts, body))
    return out


def normal(line: str) -> str:
    """The line with varying digits masked and a table's rule lines (whose widths follow them) cut to one dash."""
    return " ".join(re.sub(r"-{2,}", "-", VARIES.sub("#", line)).split())


def assert_shown(expected: str, actual: str) -> None:
    """Each line of an output block (``...`` skips some) is a line of the real output, digits aside."""
    got = {normal(line) for line in actual.splitlines()}
    for line in expected.splitlines():
        if line.strip() and line.strip() != "...":
            assert normal(line) in got, f"shown but not printed: {line!r}\n--- printed:\n{actual}"


def test_the_blocks_are_all_of_a_known_kind():
    kinds = {(lang, tuple(sorted(opts))) for lang, opts, _ in blocks(DOC.read_text())}
    assert kinds <= {("python", ("file",)), ("python", ("append", "file")), ("python", ()), ("yaml", ("file",)),
                     ("sh", ("run",)), ("sh", ("exit", "run")), ("text", ())}, kinds


@pytest.mark.slow
def test_every_block_of_the_guide_runs_as_written(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    printed = None
    ran = 0
    for lang, opts, body in blocks(DOC.read_text()):
        if "file" in opts:
            with open(tmp_path / opts["file"], "a" if "append" in opts else "w") as f:
                f.write(body)
            continue
        if lang == "text":
            assert printed is not None, "an output block follows no command"
            assert_shown(body, printed)
            printed = None
            continue
        cmd = [sys.executable, "-"] if lang == "python" else ["bash", "-e", "-"]
        proc = subprocess.run(cmd, input=body, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == int(opts.get("exit", 0)), f"{body}\n{proc.stdout}\n{proc.stderr}"
        printed = proc.stdout + proc.stderr
        ran += 1
    assert ran >= 8
    for name in ("tutorial_relu.py", "my_relu.py", "padded.py"):  # the files themselves run, too
        subprocess.run([sys.executable, name], cwd=tmp_path, env=env, check=True, timeout=120)
