"""The comparison's verdicts: no false alarm under any optimizer, every planted bug caught, and always where."""
from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import planted_layers  # noqa: F401  registers the planted layers in this process
from conftest import run_cli
from trainer.cli import main

HERE = Path(__file__).resolve().parent


def config(tmp_path, model: dict, layers: dict, *, optimizer: str = "sgd", lr: float = 0.01, loss: str = "mse",
           steps: int = 12) -> Path:
    cfg = {"name": model["name"], "imports": ["planted_layers"], "model": model, "layers": layers,
           "loss": {"name": loss}, "optimizer": {"name": optimizer, "lr": lr},
           "data": {"name": "regression", "batch_size": 32}, "train": {"max_steps": steps, "max_epochs": None},
           "log": {"dir": str(tmp_path / "runs"), "progress": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def scalars(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(glob.glob(str(folder / "events.out.tfevents.*"))[0], size_guidance={"scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_lockstep_passes_a_batch_norm_model_with_the_builtin_twins(tmp_path, capsys, optimizer):
    # the first Linear's bias feeds a batch norm: its true gradient is 0, both sides compute rounding
    # noise, and Adam turns noise into steps of size lr; the verdict must not judge that
    path = config(tmp_path, {"name": "bn_mlp"}, {"default": "custom"}, optimizer=optimizer)
    assert main(["compare", str(path), "--steps", "60"]) == 0, capsys.readouterr().out
    assert "ok: custom gradients and buffers within tolerance" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "bn_mlp-lockstep" / "version_0"
    for side in ("native", "custom"):  # two runs with the same tag: two colours on one chart
        assert len(scalars(run_dir / side).Scalars("lockstep/loss")) == 60
    score = [e.value for e in scalars(run_dir).Scalars("lockstep/grad_score")]
    assert len(score) == 60 and max(score) <= 1.0


def test_lockstep_passes_correct_twins_whose_float32_rounding_exceeds_elementwise_tolerance(tmp_path, capsys):
    # two cube layers and SGD with momentum: the grads grow large, and float32 rounding through five
    # layers lands a few elements outside assert_close's tolerance; a float64 run shows custom as
    # accurate as native there, so the verdict passes them (and counts them)
    path = config(tmp_path, {"name": "planted", "layer": "cube", "repeat": 2}, {"default": "custom"})
    assert main(["compare", str(path), "--steps", "60", "optimizer.momentum=0.9"]) == 0, capsys.readouterr().out
    run_dir = tmp_path / "runs" / "planted-lockstep" / "version_0"
    assert max(e.value for e in scalars(run_dir).Scalars("lockstep/grad_score")) <= 1.0
    assert len(scalars(run_dir).Scalars("lockstep/rescued")) == 60


def test_lockstep_names_a_batch_norm_twin_that_forgets_its_running_statistics(tmp_path, capsys):
    path = config(tmp_path, {"name": "bn_mlp", "norm": "frozen_bn"}, {"default": "custom"})
    assert main(["compare", str(path), "--steps", "5"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH: first at step 1; 5 of 5 steps" in out
    assert "step 1: buffer 1.running_mean of layer 1 (frozen_bn)" in out
    assert "culprit: layer 1 (frozen_bn): buffer 1.running_" in out


def test_lockstep_failure_names_step_parameter_and_layer(tmp_path, capsys):
    path = config(tmp_path, {"name": "planted", "layer": "cube_bad"}, {"default": "native", "cube_bad": "custom"})
    assert main(["compare", str(path), "--steps", "4"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH: first at step 1; 4 of 4 steps outside tolerance" in out
    assert "step 1: param grad 0.weight of layer 0 (linear): relative L2 1, cosine 1.000000" in out
    assert "culprit: layer 1 (cube_bad): input grad ×2 native (relative L2 1, cosine 1.000000" in out
    score = [e.value for e in scalars(tmp_path / "runs" / "planted-lockstep" / "version_0").Scalars(
        "lockstep/grad_score")]
    assert min(score) > 1.0  # the figure the verdict used is the one charted


def test_a_module_called_twice_is_named_with_its_own_numbers(tmp_path, capsys):
    report = tmp_path / "r.json"
    path = config(tmp_path, {"name": "twice", "layer": "cube_bad"}, {"default": "native", "cube_bad": "custom"})
    assert main(["compare", str(path), "--json", str(report)]) == 1
    data = json.loads(report.read_text())
    [culprit] = data["culprits"]
    assert (culprit["path"], culprit["layer"]) == ("act", "cube_bad")
    calls = {t["name"]: t for t in data["tensors"] if t["kind"] == "input_grad" and t["name"].startswith("act")}
    assert set(calls) == {"act (call 1)", "act (call 2)"}  # every call compared
    # the second call's grad_output is clean: ×2 is its own error; the first call compounds both (×4)
    assert calls["act (call 2)"]["norm_ratio"] == pytest.approx(2.0, rel=1e-4)
    assert calls["act (call 1)"]["norm_ratio"] == pytest.approx(4.0, rel=1e-4)
    assert calls["act (call 2)"]["cause"] == "culprit"
    assert culprit["what"].startswith("input grad ×2 native (relative L2 1, cosine 1.000000")
    assert "elements differ, worst at [" in culprit["what"]
    causes = {t["name"]: t["cause"] for t in data["tensors"] if not t["ok"]}
    assert causes["inp.weight"] == "consequence of act"


def test_the_tutorial_relu_is_wrong_only_where_its_input_is_exactly_zero(tmp_path, capsys):
    path = config(tmp_path, {"name": "kink"}, {"default": "native", "tutorial_relu": "custom"})
    assert main(["compare", str(path)]) == 1
    out = capsys.readouterr().out
    [line] = [ln for ln in out.splitlines() if ln.startswith("culprit:")]
    assert line.startswith("culprit: layer 2 (tutorial_relu): input grad")
    assert "differing elements have input exactly 0;" in line + ";" or "differing elements have input exactly 0)" \
        in line


def test_small_angle_errors_carry_their_size_never_a_bare_ratio(tmp_path, capsys):
    path = config(tmp_path, {"name": "planted", "layer": "square_plus_bad"},
                  {"default": "native", "square_plus_bad": "custom"})
    assert main(["compare", str(path)]) == 1
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("culprit:")]
    assert "relative L2" in line and "cosine" in line and "elements differ, worst at" in line


@pytest.mark.parametrize("layer,function", [
    ("raiser", "BadViewFunction.backward raised RuntimeError: shape '[7, -1]' is invalid"),
    ("wrong_shape", "WrongShapeFunction.backward raised RuntimeError: Function WrongShapeFunctionBackward returned "
                    "an invalid gradient"),
    ("bad_dtype", "raised OutputMismatch: its output is float64 [32, 8], native's float32 [32, 8]")])
def test_a_raising_backward_is_one_error_line_naming_layer_and_function(tmp_path, layer, function):
    report = tmp_path / "r.json"
    path = config(tmp_path, {"name": "planted", "layer": layer}, {"default": "native", layer: "custom"})
    proc = run_cli("compare", str(path), "--json", str(report), cwd=HERE)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: layer 1 ({layer}): {function}"), line
    assert "Traceback" not in proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["layers"]["1"] == {"layer": layer, "ok": False, "error": line[len(
        f"error: layer 1 ({layer}): "):]}


def test_a_broken_twin_is_never_blamed_on_the_data(tmp_path):
    path = config(tmp_path, {"name": "planted", "layer": "bad_dtype"}, {"default": "native", "bad_dtype": "custom"})
    proc = run_cli("run", str(path), cwd=HERE)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: layers: a custom twin fails where its native layer runs: "), proc.stderr
    assert not (tmp_path / "runs").exists()


def test_compare_with_nothing_to_swap_says_so(tmp_path):
    path = config(tmp_path, {"name": "scale"}, {"default": "custom"}, loss="plain_mse")
    proc = run_cli("compare", str(path), cwd=HERE)
    assert proc.returncode == 2 and proc.stderr.startswith("error: layers: no layer of model scale"), proc.stderr


def test_shadow_mode_warns_summarizes_and_can_fail_the_run(tmp_path):
    path = config(tmp_path, {"name": "planted", "layer": "cube_bad"}, {"default": "native", "cube_bad": "custom"})
    proc = run_cli("run", str(path), "compare.every=4", cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: shadow mode")]
    assert warnings == [ln for ln in warnings if "layer 1 (cube_bad): input_grad differs from native at step 4 "
                        "(relative L2 1, cosine 1.000000, score" in ln] and len(warnings) == 1
    assert "shadow mode: layer 1 (cube_bad) failed 3 of 3 checks, at steps 4, 8, 12 (input_grad)" in proc.stderr
    proc = run_cli("run", str(path), "compare.every=4", "compare.fail=true", cwd=HERE)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: shadow mode: layer 1 (cube_bad): input_grad differs from native at step 4")


def test_shadow_mode_compares_buffers(tmp_path):
    path = config(tmp_path, {"name": "bn_mlp", "norm": "frozen_bn"}, {"default": "native", "frozen_bn": "custom"})
    proc = run_cli("run", str(path), "compare.every=4", cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    assert "shadow mode: layer 1 (frozen_bn) failed 3 of 3 checks, at steps 4, 8, 12 (buffer.running_mean, " \
           "buffer.running_var)" in proc.stderr
    proc = run_cli("run", str(config(tmp_path, {"name": "bn_mlp"}, {"default": "custom"})), "compare.every=4",
                   cwd=HERE)
    assert proc.returncode == 0 and "every swapped layer within tolerance at all 3 checks" in proc.stderr
