"""Config loading: overrides, defaults, strict validation, and every bad input as one `error:` line."""
from __future__ import annotations

import textwrap

import pytest
import yaml

from conftest import QUICKSTART, run_cli
from trainer import ConfigError, load_config
from trainer.cli import main


def test_overrides_are_yaml_scalars_and_defaults_are_filled():
    cfg = load_config(QUICKSTART, ["optimizer.lr=1e-3", "layers.default=custom", "train.max_steps=7",
                                   "data.batch_size=32", "train.max_epochs=null"])
    assert cfg.optimizer.kwargs["lr"] == 0.001 and isinstance(cfg.optimizer.kwargs["lr"], float)
    assert cfg.optimizer.kwargs["momentum"] == 0.0  # filled from sgd's signature
    assert cfg.layers == {"default": "custom"}
    assert cfg.train.max_steps == 7 and cfg.train.max_epochs is None
    assert cfg.data.batch_size == 32 and cfg.data.kwargs["n_samples"] == 1024


@pytest.mark.parametrize("written,kept", [("16", "16"), ("32", "32"), ("bf16", "bf16"), ("'16'", "16")])
def test_precision_may_be_written_as_a_number(written, kept):
    """YAML reads ``precision: 16`` as an int; the config keeps every precision as the string DESIGN.md names."""
    assert load_config(QUICKSTART, [f"train.precision={written}"]).train.precision == kept


def test_resolved_yaml_round_trips():
    cfg = load_config(QUICKSTART, ["model.name=mlp", "model.hidden=[8, 8]", "model.activation=gelu"])
    again = load_config(yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()
    assert again.model.kwargs["hidden"] == [8, 8]


def test_imports_register_user_components(tmp_path):
    (tmp_path / "my_parts.py").write_text(textwrap.dedent("""
        from torch import nn
        from trainer import models
        @models.register("tiny_user_model")
        def tiny(width: int = 3):
            return nn.Linear(10, 1)
    """))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(QUICKSTART.read_text() + "imports: [my_parts]\n")
    cfg = load_config(cfg_file, ["model={name: tiny_user_model}"])
    assert cfg.model.name == "tiny_user_model" and cfg.model.kwargs == {"width": 3}


def write(tmp_path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


# (id, argv after `trainer`, text the error must name, text of the suggestion)
BAD = [
    ("malformed-yaml", lambda t: ["run", write(t, "model: {name: mlp\nloss: mse\n")], "bad.yaml", "invalid YAML"),
    ("python-tag", lambda t: ["run", write(t, "model: !!python/object:os.system {}\n")], "bad.yaml", "safe_load"),
    ("missing-file", lambda t: ["run", str(t / "nope.yaml")], "nope.yaml", "no such config file"),
    ("unknown-top-key", lambda t: ["run", write(t, QUICKSTART.read_text() + "optimzer: {}\n")], "optimzer",
     "did you mean 'optimizer'"),
    ("unknown-nested-key", lambda t: ["run", str(QUICKSTART), "train.max_step=3"], "train.max_step",
     "did you mean 'max_steps'"),
    ("unknown-kwarg", lambda t: ["run", str(QUICKSTART), "optimizer.lrr=0.1"], "optimizer.lrr", "did you mean 'lr'"),
    ("wrong-type", lambda t: ["run", str(QUICKSTART), "optimizer.lr=fast"], "optimizer.lr", "expected a number"),
    ("wrong-type-int", lambda t: ["run", str(QUICKSTART), "train.max_epochs=1.5"], "train.max_epochs", "integer"),
    ("unknown-optimizer", lambda t: ["run", str(QUICKSTART), "optimizer.name=adamm"], "optimizer.name",
     "did you mean 'adam'"),
    ("unknown-layer", lambda t: ["run", str(QUICKSTART), "layers.rellu=custom"], "layers.rellu",
     "did you mean 'relu'"),
    ("unknown-impl", lambda t: ["run", str(QUICKSTART), "layers.relu=costum"], "layers.relu",
     "did you mean 'custom'"),
    ("unknown-activation", lambda t: ["run", str(QUICKSTART), "model={name: mlp, in_features: 10, out_features: 1, "
                                      "activation: rleu}"], "model.activation", "did you mean 'relu'"),
    ("bad-override", lambda t: ["run", str(QUICKSTART), "optimizer.lr"], "optimizer.lr", "key=value"),
    ("missing-import", lambda t: ["run", str(QUICKSTART), "imports=[no_such_module_xyz]"], "imports[0]",
     "no_such_module_xyz"),
    ("negative-lr", lambda t: ["run", str(QUICKSTART), "optimizer.lr=-0.1"], "optimizer.lr", "positive"),
    ("zero-batch", lambda t: ["run", str(QUICKSTART), "data.batch_size=0"], "data.batch_size", "at least 1"),
    ("fp16-on-cpu", lambda t: ["run", str(QUICKSTART), "train.precision=16", "train.device=cpu"], "train.precision",
     "use precision: bf16 on CPU"),
    ("unknown-precision", lambda t: ["run", str(QUICKSTART), "train.precision=8"], "train.precision",
     "valid: 16, 32, bf16"),
    ("no-limit", lambda t: ["run", str(QUICKSTART), "train.max_epochs=null"], "train.max_steps", "set one"),
    ("missing-section", lambda t: ["run", write(t, "model: {name: linear}\n")], "loss", "missing section"),
    ("missing-data-file", lambda t: ["run", str(QUICKSTART), "data={name: tensor_file, path: nope.csv, target: y}"],
     "data.path", "no such file"),
    ("model-misfits-data", lambda t: ["run", str(QUICKSTART), "model.in_features=3"], "model", "in/out sizes"),
    ("no-cuda", lambda t: ["run", str(QUICKSTART), "train.device=cuda"], "train.device", "auto or cpu"),
    ("bad-device", lambda t: ["run", str(QUICKSTART), "train.device=gpu"], "train.device", "valid"),
    ("resume-missing", lambda t: ["run", str(QUICKSTART), "--resume", str(t / "runs" / "none")], "--resume",
     "runs/<name>/version_<N>"),
    ("config-cmd", lambda t: ["config", str(QUICKSTART), "loss.name=msee"], "loss.name", "did you mean 'mse'"),
    ("unknown-gradcheck-layer", lambda t: ["gradcheck", "rellu"], "LAYER", "did you mean 'relu'"),
    ("bad-sweep", lambda t: ["run", str(QUICKSTART), "--sweep", "optimizer.lr"], "optimizer.lr", "key=value1,value2"),
]


def check_error(code: int, err: str, path: str, hint: str, tmp_path) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert path in lines[0] and hint in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("version_*"))


@pytest.mark.parametrize("argv", [b[1] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_error_line(argv, tmp_path, capsys, monkeypatch):
    case = next(b for b in BAD if b[1] is argv)
    monkeypatch.chdir(tmp_path)
    args = argv(tmp_path)
    if args[0] == "run":
        args += [f"log.dir={tmp_path / 'runs'}"] if "--resume" not in args else []
    code = main(args)
    check_error(code, capsys.readouterr().err, case[2], case[3], tmp_path)


REAL = ["malformed-yaml", "python-tag", "unknown-optimizer", "bad-override", "missing-import", "model-misfits-data",
        "no-cuda", "unknown-gradcheck-layer"]  # the whole table runs in process above; these also as real processes


@pytest.mark.slow
@pytest.mark.parametrize("argv", [b[1] for b in BAD if b[0] in REAL], ids=REAL)
def test_bad_input_in_a_real_process(argv, tmp_path):
    case = next(b for b in BAD if b[1] is argv)
    args = argv(tmp_path)
    if args[0] == "run" and "--resume" not in args:
        args += [f"log.dir={tmp_path / 'runs'}"]
    proc = run_cli(*args, cwd=tmp_path)
    check_error(proc.returncode, proc.stderr, case[2], case[3], tmp_path)


def test_config_error_carries_path_and_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, ["optimizer.momentun=0.9"])
    assert e.value.path == "optimizer.momentun" and "momentum" in e.value.suggestion
