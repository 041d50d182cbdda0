"""Repeatable runs: a run's weights depend on its config and seed only, in every combination the docs allow."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import repeat_runs

HERE = Path(__file__).resolve().parent


def fresh_process(out: Path, first: int, log_dir: Path) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("OMP_NUM_THREADS", None)  # every core: the first parallel region is what this test is about
    proc = subprocess.run([sys.executable, str(HERE / "repeat_runs.py"), str(out), str(first), str(log_dir)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_combination_is_bit_identical_across_fresh_processes(tmp_path):
    """workers 0/2 x twins native/custom x dropout on/off x accumulate 1/2, 5 fresh processes each.

    Each process trains all 16 combinations, starting at a different one, so five of them are a
    fresh process's first run, the one the first-parallel-region inaccuracy hit.
    """
    n = 5
    firsts = [i * len(repeat_runs.MATRIX) // n for i in range(n)]
    with ThreadPoolExecutor(2) as pool:  # two processes at a time: the cores this suite is sized for
        results = list(pool.map(lambda i: fresh_process(tmp_path / f"{i}.json", firsts[i], tmp_path / f"runs{i}"),
                                range(n)))
    for combo in repeat_runs.MATRIX:
        name = repeat_runs.name(*combo)
        assert len({r[f"dataset/{name}"] for r in results}) == 1, f"the dataset differs: {name}"
        assert len({r[name] for r in results}) == 1, f"the weights differ: {name}"
