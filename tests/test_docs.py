"""README and docs describe the software as it is: their runnable blocks run, their links resolve, no history.

A fenced block whose info string holds ``run`` (```` ```sh run ````, ```` ```python run ````) runs as written,
from a folder holding a copy of ``configs/``, with this venv's ``trainer`` on the PATH. docs/twins.md has
its own, stricter runner (tests/test_docs_twins.py: files, outputs); docs/architecture.md's examples run in
tests/test_callbacks.py.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.S | re.M)
HISTORY = re.compile(r"the stop before|earlier (stops?|versions?|code)|this stop|previous(ly)? (stop|version)|used to "
                     r"(be|raise|take|give)|was fixed|were fixed|before the fix|in the old", re.I)
RUNNABLE = [(page, i, lang, body) for page in PAGES if page.name != "twins.md"
            for i, (lang, info, body) in enumerate(BLOCK.findall(page.read_text())) if "run" in info.split()]


def test_the_readme_and_every_guide_have_runnable_blocks():
    pages = {page.name for page, *_ in RUNNABLE}
    assert "README.md" in pages


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_no_page_tells_how_the_project_got_here(page):
    found = [line for line in page.read_text().splitlines() if HISTORY.search(line)]
    assert not found, found


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


@pytest.mark.slow
@pytest.mark.parametrize("page,index,lang,body", RUNNABLE,
                         ids=[f"{page.name}-{i}" for page, i, _, _ in RUNNABLE])
def test_runnable_block_runs_as_written(tmp_path, page, index, lang, body):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = ["bash", "-euo", "pipefail", "-c", body] if lang in ("sh", "bash") else [sys.executable, "-c", body]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{page.name} block {index} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
