"""The experiments run as users run them; benchmarks only as smoke runs (they are timed, tests are not)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / name), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_custom_relu_experiment_finds_the_tutorial_bug_at_zero():
    proc = script("custom_relu.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "culprit: layer 1 (relu): input grad" in proc.stdout
    assert proc.stdout.rstrip().endswith("ok: 7 of 7 tensors within tolerance")


@pytest.mark.slow
def test_seed_walkthrough_runs_its_three_steps(tmp_path):
    proc = script("seed_walkthrough.py", "--logdir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for step in ("Step 1", "Step 2", "Step 3"):
        assert step in proc.stdout
    assert "ReLUFunctionBackward" in proc.stdout and "largest weight difference after 100 steps" in proc.stdout
    run_dir = tmp_path / "quickstart" / "version_0"  # left where the printed line says, to open in TensorBoard
    assert f"run directory: {run_dir}" in proc.stdout and (run_dir / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_benchmarks_run_and_print_their_ratios():
    """A few steps and sizes only: this checks the scripts work, not how fast anything is."""
    proc = script("bench_overhead.py", "--steps", "300", "--repeats", "1", "--model", "tiny")
    assert proc.returncode == 0, proc.stderr
    # two ratios (wall clock, CPU time) per row: short epochs, long epochs, gathered batches, shadow mode
    assert [line.split()[-2:][0][-1] + line.split()[-1][-1] for line in proc.stdout.splitlines()[1:]] == ["xx"] * 4
    proc = script("bench_checkpoint_stall.py", "--size-mb", "1", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 5 and proc.stdout.count("x\n") == 3, proc.stdout
    proc = script("checkpoint_steps.py", "--steps", "300")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()  # a title, a header, then per way its stretches (+ extra) and the ordinary ones
    assert len(lines) == 6 and [len(line.split()) for line in lines[2:]] == [7, 6, 9, 6], proc.stdout
    proc = script("bench_layers.py", "--sizes", "1e3", "--layers", "relu", "linear", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 3 and proc.stdout.count("x") >= 4


@pytest.mark.slow
def test_device_check_passes_on_cpu_and_refuses_a_missing_gpu():
    """The GPU machine's checks (mixed precision twins, resume with the device RNG, DDP, every twin) run here on CPU."""
    proc = script("device_check.py", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok   ") == 7 and "FAIL" not in proc.stdout, proc.stdout
    assert " 0 problem(s)" in proc.stdout, proc.stdout
    if not torch.cuda.is_available():
        for name in ("device_check.py", "bench_layers.py"):
            proc = script(name, "--device", "cuda")
            assert proc.returncode == 2 and proc.stderr.startswith("error: --device cuda"), proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["bench_layers.py", "--rounds", "0"], ["bench_overhead.py", "--steps", "100"],
                                  ["device_check.py", "--procs", "0"], ["count_overhead.py", "--steps", "500", "300"],
                                  ["checkpoint_steps.py", "--steps", "100"]],
                         ids=lambda a: a[0])
def test_bad_arguments_are_one_error_line(argv):
    proc = script(*argv)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
