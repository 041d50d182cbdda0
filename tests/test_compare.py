"""Gradient comparison: planted backward bugs are caught and named, correct twins pass, shadow and lockstep log."""
from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import planted_layers  # noqa: F401  registers the planted layers in this process
from conftest import run_cli
from trainer import Trainer, load_config
from trainer.cli import main
from trainer.check import diff as diff_module
from trainer.check.compare import Comparison, diff, diffs

HERE = Path(__file__).resolve().parent


def planted_config(tmp_path, layer: str, *more: str) -> Path:
    cfg = {"name": "planted", "imports": ["planted_layers"], "model": {"name": "planted", "layer": layer},
           "layers": {"default": "native", layer: "custom"}, "loss": {"name": "mse"},
           "optimizer": {"name": "sgd", "lr": 0.01}, "data": {"name": "regression", "batch_size": 32},
           "train": {"max_steps": 12, "max_epochs": None}, "log": {"dir": str(tmp_path / "runs"), "progress": False}}
    path = tmp_path / f"{layer}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


EXPECT = {"cube": "input grad ×2 native", "square_plus": "input grad points elsewhere",
          "leaky": "input grad points elsewhere", "matmul": "param grad 1.weight points elsewhere"}


@pytest.mark.parametrize("layer", list(EXPECT))
def test_planted_bug_is_caught_and_named_and_the_right_twin_passes(layer, tmp_path, capsys):
    report = tmp_path / "report.json"
    code = main(["compare", str(planted_config(tmp_path, f"{layer}_bad")), "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 1, out
    data = json.loads(report.read_text())
    assert data["ok"] is False
    bad = {(t["kind"], t["name"]) for t in data["tensors"] if not t["ok"]}
    if layer == "matmul":  # a transposed dW spoils that grad alone
        assert bad == {("param_grad", "1.weight")}
    else:  # a wrong dx spoils every grad upstream of it, and nothing downstream
        assert {("input_grad", "1"), ("param_grad", "0.weight")} <= bad
        assert not {("param_grad", "2.weight"), ("layer_output", "1")} & bad
    [culprit] = data["culprits"]
    assert (culprit["path"], culprit["layer"]) == ("1", f"{layer}_bad")
    assert culprit["what"].startswith(EXPECT[layer]), culprit
    assert f"culprit: layer 1 ({layer}_bad): {EXPECT[layer]}" in out
    assert not (tmp_path / "runs").exists()  # a one-shot comparison writes no run

    assert main(["compare", str(planted_config(tmp_path, layer))]) == 0, capsys.readouterr().out


def test_bisect_names_each_guilty_instance(tmp_path, capsys):
    code = main(["compare", str(planted_config(tmp_path, "cube_bad")), "model.repeat=2"])
    out = capsys.readouterr().out
    assert code == 1
    assert "culprit: layer 1 (cube_bad)" in out and "culprit: layer 3 (cube_bad)" in out


def test_json_follows_the_design_schema_in_a_real_process(tmp_path):
    report = tmp_path / "r.json"
    proc = run_cli("compare", str(planted_config(tmp_path, "leaky_bad")), "--json", str(report), cwd=HERE)
    assert proc.returncode == 1, proc.stderr
    data = json.loads(report.read_text())
    kinds = {t["kind"] for t in data["tensors"]}
    assert kinds == {"loss", "output", "param_grad", "layer_output", "input_grad"}
    for t in data["tensors"]:
        assert {"name", "kind", "ok", "max_abs_diff", "max_rel_diff", "cosine"} <= set(t)
    assert [t["ok"] for t in data["tensors"]] == sorted(t["ok"] for t in data["tensors"])  # worst first


def test_seed_network_with_all_builtin_twins_is_clean_on_exact_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(16, 4)
    x[::2] = 0.0  # rows of zeros: the ReLU sees exact zeros
    y = torch.randn(16, 1)
    comparison = Comparison(model, nn.MSELoss(), [(x, y)], {"default": "custom"})
    assert set(comparison.swapped.values()) == {"linear", "relu", "mse"}
    report = comparison.report()
    assert report.ok, [d for d in report.tensors if not d.ok]
    assert report.memory["1"]["custom"] <= report.memory["1"]["native"]


def test_diff_numbers_and_vacuous_guard():
    n = torch.tensor([1.0, 2.0, -3.0])
    d = diff("g", "param_grad", 2 * n, n)
    assert not d.ok and d.norm_ratio == pytest.approx(2.0) and d.cosine == pytest.approx(1.0)
    assert d.max_abs_diff == pytest.approx(3.0) and d.max_rel_diff == pytest.approx(1.0)
    assert diff("g", "param_grad", -n, n).cosine == pytest.approx(-1.0)
    tiny = diff("g", "param_grad", torch.full((3,), 1e-7), torch.zeros(3))
    assert tiny.ok and tiny.vacuous
    nan = diff("g", "param_grad", torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))
    assert nan.ok  # NaN where native has NaN is equal, like assert_close(equal_nan=True)
    assert not diff("g", "param_grad", torch.tensor([float("nan")]), torch.tensor([1.0])).ok


@pytest.mark.parametrize("group", [1 << 20, 3], ids=["one-group", "groups-of-3-elements"])
def test_diffs_at_once_equal_one_at_a_time_and_agree_with_assert_close(monkeypatch, group):
    monkeypatch.setattr(diff_module, "_GROUP_NUMEL", group)
    inf, nan = float("inf"), float("nan")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, generator=g)
    pairs = [
        (base + 1e-7 * torch.randn(50, generator=g), base),                     # within float32 tolerance
        (base * (1 + 1e-3), base),                                              # outside it
        (torch.tensor([inf, -inf, 1.0]), torch.tensor([inf, -inf, 1.0])),      # equal infinities
        (torch.tensor([inf, 1.0]), torch.tensor([1.0, 1.0])),                   # inf on one side
        (torch.tensor([nan, 2.0]), torch.tensor([nan, 2.0])),
        (torch.tensor([0.0, 1e-6]), torch.tensor([0.0, 0.0])),                  # within atol of zeros
        (torch.zeros(0), torch.zeros(0)),
        (torch.zeros(3), torch.zeros(3)),
        (torch.ones(2), torch.ones(3)),                                         # shapes differ
        (base.double() + 1e-9, base.double()),                                  # float64 tolerances
        (base.to(torch.bfloat16), (base * 1.001).to(torch.bfloat16)),
    ]
    together = diffs((f"t{i}", "param_grad", c, n) for i, (c, n) in enumerate(pairs))
    for (c, n), d in zip(pairs, together):
        alone = diff(d.name, "param_grad", c, n)  # no leaks between a batch's tensors
        for field in dataclasses.fields(d):  # maxima exactly; norms from a matmul, whose rounding may vary
            a, b = getattr(d, field.name), getattr(alone, field.name)
            exact = field.name not in ("rel_l2", "cosine", "norm_ratio")
            assert a == b or a != a and b != b or not exact and a == pytest.approx(b, rel=1e-5), (field.name, a, b)
        try:
            torch.testing.assert_close(c, n, equal_nan=True)
            expected = True
        except AssertionError:
            expected = False
        assert d.ok == expected, (d, c, n)
    assert together[7].rel_l2 == 0.0 and together[7].vacuous  # zeros against zeros: no error, and says so
    big = diff("g", "param_grad", torch.full((4,), 2e20), torch.full((4,), 1e20))  # squares overflow float32
    assert big.norm_ratio == pytest.approx(2.0) and big.cosine == pytest.approx(1.0)


def scalars(run_dir) -> EventAccumulator:
    acc = EventAccumulator(glob.glob(str(run_dir / "events.out.tfevents.*"))[0], size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_shadow_mode_logs_each_swapped_layer(tmp_path):
    cfg = load_config(planted_config(tmp_path, "cube"), ["compare.every=4", "layers.default=custom"])
    result = Trainer(cfg).fit()
    acc = scalars(result.run_dir)
    tags = set(acc.Tags()["scalars"])
    for path, params in {"0.linear": ["weight", "bias"], "1.cube": [], "2.linear": ["weight", "bias"],
                         "loss.mse": []}.items():  # named by module path and layer
        for tensor in ["output", "input_grad", *params]:
            assert f"vs_native/{path}/{tensor}/max_abs_diff" in tags, (path, tensor)
            assert [e.step for e in acc.Scalars(f"vs_native/{path}/{tensor}/ok")] == [4, 8, 12]
            assert all(e.value == 1.0 for e in acc.Scalars(f"vs_native/{path}/{tensor}/ok"))
        assert f"vs_native/{path}/saved_bytes/custom" in tags
    groups = sorted({t.split("/")[0] for t in tags})
    assert groups[-1] == "vs_native" and {"train", "val"} <= set(groups)  # listed after train/ and val/
    bad = load_config(planted_config(tmp_path, "cube_bad"), ["compare.every=4"])
    acc = scalars(Trainer(bad).fit().run_dir)
    ratio = [e.value for e in acc.Scalars("vs_native/1.cube_bad/input_grad/norm_ratio")]
    assert ratio == pytest.approx([2.0] * 3)


def test_shadow_mode_leaves_training_unchanged(tmp_path):
    plain = Trainer(load_config(planted_config(tmp_path, "cube"), ["layers.default=custom"]))
    plain.fit()
    shadowed = Trainer(load_config(planted_config(tmp_path, "cube"), ["layers.default=custom", "compare.every=3"]))
    shadowed.fit()
    for p, q in zip(plain.model.parameters(), shadowed.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("layer,code", [("cube", 0), ("cube_bad", 1)])
def test_lockstep_logs_divergence(tmp_path, capsys, layer, code):
    assert main(["compare", str(planted_config(tmp_path, layer)), "--steps", "15"]) == code
    run_dir = tmp_path / "runs" / "planted-lockstep" / "version_0"
    assert str(run_dir) in capsys.readouterr().out
    acc = scalars(run_dir)
    assert {"lockstep/grad_score", "lockstep/buffer_score", "lockstep/param_rel_l2",
            "lockstep/loss_abs_diff"} <= set(acc.Tags()["scalars"])
    score = [e.value for e in acc.Scalars("lockstep/grad_score")]
    assert len(score) == 15 and (max(score) <= 1.0) == (code == 0)
    for side in ("native", "custom"):  # the same tag in two runs: TensorBoard overlays them in two colours
        assert scalars(run_dir / side).Tags()["scalars"] == ["lockstep/loss"]
    layout = acc.summary_metadata  # the custom-scalars layout overlays native and custom loss
    assert any(m.plugin_data.plugin_name == "custom_scalars" for m in layout.values())


@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_json_to_a_path_that_cannot_be_written_is_one_error_line_before_any_output(tmp_path, where):
    (tmp_path / "a_file").write_text("")
    target = {"folder": tmp_path, "under-a-file": tmp_path / "a_file" / "r.json"}[where]
    proc = run_cli("compare", str(planted_config(tmp_path, "leaky_bad")), "--json", str(target), cwd=HERE)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: --json: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "is a folder" in proc.stderr if where == "folder" else "no folder for" in proc.stderr
    assert not (tmp_path / "runs").exists()
