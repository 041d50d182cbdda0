"""The experiments run as users run them; benchmarks are not run here (they are timed, tests are not)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT


def script(name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / name)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_custom_relu_experiment_finds_the_tutorial_bug_at_zero():
    proc = script("custom_relu.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "culprit: layer 1 (seed_relu): input grad" in proc.stdout
    assert proc.stdout.rstrip().endswith("ok: 7 of 7 tensors within tolerance")


@pytest.mark.slow
def test_seed_walkthrough_runs_its_three_steps():
    proc = script("seed_walkthrough.py")
    assert proc.returncode == 0, proc.stderr
    for step in ("Step 1", "Step 2", "Step 3"):
        assert step in proc.stdout
    assert "ReLUFunctionBackward" in proc.stdout and "largest weight difference after 100 steps" in proc.stdout
