"""The `trainer` command in real subprocesses: run, config, layers, gradcheck, sweeps and interrupts."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml

from conftest import QUICKSTART, run_cli

WRONG_CUBE = textwrap.dedent("""
    import torch
    from torch import nn
    from trainer import layers
    from trainer.layers import Case

    class Cube(nn.Module):
        def forward(self, x):
            return x ** 3

    class CubeFunction(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * x * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * 6 * x * x  # wrong: d x^3/dx = 3 x^2

    class CustomCube(Cube):
        function = CubeFunction
        def forward(self, x):
            return CubeFunction.apply(x)

    layers.register("cube", native=Cube, custom=CustomCube,
                    cases=lambda: [Case("cube", Cube, lambda g: (torch.randn(5, dtype=torch.float64, generator=g),))])
""")


def test_run_writes_a_run_directory_and_prints_it(tmp_path):
    proc = run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "train.max_epochs=2")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "quickstart" / "version_0"
    assert proc.stdout.startswith(f"run: {run_dir}") and "val/loss=" in proc.stdout
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["optimizer"]["lr"] == 0.01 and resolved["train"]["max_epochs"] == 2
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 26 and set(state["model"]) == {"weight", "bias"}


def test_console_script_and_config_command(tmp_path):
    exe = shutil.which("trainer") or pytest.skip("console script not installed")
    proc = subprocess.run([exe, "config", str(QUICKSTART), "optimizer.lr=0.5", "layers.default=custom"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["optimizer"] == {"name": "sgd", "lr": 0.5, "momentum": 0.0, "dampening": 0.0,
                                     "weight_decay": 0.0, "nesterov": False}
    assert resolved["layers"] == {"default": "custom"} and resolved["log"]["every"] == 10


BUILTIN_LAYERS = {"relu", "leaky_relu", "elu", "gelu", "silu", "mish", "softplus", "sigmoid", "tanh", "hardsigmoid",
                  "hardswish", "softmax", "log_softmax", "linear", "conv2d", "layer_norm", "batch_norm", "dropout",
                  "embedding", "mse", "l1", "huber", "cross_entropy", "bce_with_logits"}  # DESIGN.md's list


def test_layers_table_lists_the_registry():
    proc = run_cli("layers")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = [line.split() for line in lines[2:lines.index("")]]  # the table, then its legend
    assert {r[0] for r in rows} == BUILTIN_LAYERS
    relu = next(r for r in rows if r[0] == "relu")
    assert relu[1:3] == ["ReLU", "4/4"]  # 4 bytes per element, like native
    assert max(map(len, lines)) <= 100, max(lines, key=len)


@pytest.mark.slow
def test_gradcheck_passes_builtins_and_fails_a_wrong_user_twin(tmp_path):
    ok = run_cli("gradcheck", "relu")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 failed" in ok.stdout and "gradgradcheck" in ok.stdout
    (tmp_path / "wrong_cube.py").write_text(WRONG_CUBE)
    bad = run_cli("gradcheck", "cube", "--imports", "wrong_cube", cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL" in bad.stdout and "cube" in bad.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given where there is no CUDA device")
def test_gradcheck_on_cuda_without_a_gpu_is_one_error_line():
    proc = run_cli("gradcheck", "relu", "--device", "cuda")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: --device: cuda asked for") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.slow
def test_sweep_runs_the_cartesian_product(tmp_path):
    proc = run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "train.max_steps=3",
                   "--sweep", "optimizer.lr=0.1,0.01", "model={name: mlp, in_features: 10, out_features: 1, "
                   "hidden: [4]},{name: mlp, in_features: 10, out_features: 1, hidden: [8]}")
    assert proc.returncode == 0, proc.stderr
    runs = sorted((tmp_path / "quickstart").iterdir())
    assert [r.name for r in runs] == [f"version_{i}" for i in range(4)]
    seen = {(c["optimizer"]["lr"], c["model"]["hidden"][0])
            for c in (yaml.safe_load((r / "config.yaml").read_text()) for r in runs)}
    assert seen == {(0.1, 4), (0.1, 8), (0.01, 4), (0.01, 8)}
    assert sum(line.startswith("done: ") for line in proc.stdout.splitlines()) == 4


def wait_for(path, proc, timeout=120.0):
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout, f"{path} never appeared"
        time.sleep(0.05)


BIG_EPOCH = ["data.n_samples=50000", "data.batch_size=1", "data.val_fraction=0"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_a_checkpoint_and_exits(tmp_path, sig, code):
    # one epoch of 40,000 steps and no step cadence: the only checkpoint can be the one saved on the way out
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(QUICKSTART), f"log.dir={tmp_path}",
                             *BIG_EPOCH],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "quickstart" / "version_0"
    wait_for(run_dir / "config.yaml", proc)
    time.sleep(2.0)  # into the loop
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().startswith("error: interrupted by") and "Traceback" not in err
    ckpt = run_dir / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] > 0 and state["epoch"] == 0 and state["batch_in_epoch"] == state["step"]
    assert out.startswith(f"run: {run_dir}") and "done:" not in out  # no summary for an interrupted run


def test_a_sweep_with_one_bad_combination_writes_nothing(tmp_path, capsys):
    from trainer.cli import main
    assert main(["run", str(QUICKSTART), f"log.dir={tmp_path}", "train.max_steps=2",
                 "--sweep", "optimizer.lr=0.1,-1"]) == 2  # -1 is caught when the second optimizer is built
    assert "optimizer.lr" in capsys.readouterr().err and not (tmp_path / "quickstart").exists()
