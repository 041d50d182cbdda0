"""Real `torchrun` with two CPU processes (gloo) against one process with the same global batch."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from conftest import QUICKSTART
from trainer import Trainer

MODEL = "model={name: mlp, in_features: 10, out_features: 1, hidden: [16, 16], layer_norm: true}"


def torchrun(*args: str, cwd=None) -> subprocess.CompletedProcess:
    exe = shutil.which("torchrun") or pytest.skip("torchrun not installed")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([exe, "--standalone", "--nproc_per_node=2", "-m", "trainer", *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["native", "custom"])
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, quick, impl):
    common = [MODEL, "train.max_epochs=2", f"layers.default={impl}", "optimizer={name: adam, lr: 0.01}"]
    proc = torchrun("run", str(QUICKSTART), f"log.dir={tmp_path / 'ddp'}", "log.progress=false",
                    "data.batch_size=32", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "ddp" / "quickstart").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # rank 0 alone made a run directory
    assert len(list(runs[0].glob("events.out.tfevents.*"))) == 1  # and wrote one event file
    lines = proc.stdout.splitlines()  # and printed the run once: rank 0 alone talks
    assert [line.split()[0] for line in lines if line.split()[0] in ("run:", "done:")] == ["run:", "done:"]
    assert len(lines) == len(set(lines))  # no progress line twice
    state = torch.load(runs[0] / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])

    single = Trainer(quick("data.batch_size=64", *common))
    single.fit()
    assert state["step"] == single.step == 26
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(state["model"][name], p, rtol=1e-5, atol=1e-5, msg=name)
    val = float(proc.stdout.split("val/loss=")[1].split()[0])
    assert val == pytest.approx(single.metrics["val/loss"], rel=1e-4)  # averaged over ranks


@pytest.mark.slow
def test_compare_under_torchrun_reports_once(tmp_path):
    proc = torchrun("compare", str(QUICKSTART), MODEL, "layers.default=custom", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("tensors within tolerance") == 1
    assert (tmp_path / "r.json").is_file()


THREADS_AFTER = """
import os, pathlib, sys
from trainer.cli import run_command
code = run_command(sys.argv[2:])
threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
pathlib.Path(sys.argv[1], f"rank{os.environ['RANK']}").write_text(f"exit {code} threads {threads}")
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through Linux's /proc")
def test_process_group_is_freed_before_the_interpreter_exits(tmp_path):
    """A gloo worker thread still alive at exit can abort the process (SIGABRT) while it releases a tensor."""
    script = tmp_path / "threads_after.py"
    script.write_text(THREADS_AFTER)
    exe = shutil.which("torchrun") or pytest.skip("torchrun not installed")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([exe, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path), "compare",
                           str(QUICKSTART), MODEL, "layers.default=custom"], capture_output=True, text=True,
                           timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)]
    assert [line.split(" threads ")[0] for line in lines] == ["exit 0", "exit 0"], lines
    assert not any("gloo" in line for line in lines), lines  # the process group is gone, and its threads with it
