"""Bounded input and no wrong accepts: every mistake below is one `error:` line, exit 2, nothing written."""
from __future__ import annotations

import textwrap
import time

import pytest
import yaml

from conftest import QUICKSTART, run_cli
from trainer import ConfigError, Trainer, bounded, load_config
from trainer.cli import main

BOMB = textwrap.dedent("""\
    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    """)


def with_model_kwarg(value_yaml: str) -> str:
    """The quickstart config with ``value_yaml`` under an unannotated model keyword (the path the attack used)."""
    return QUICKSTART.read_text() + value_yaml


def error_of(tmp_path, capsys, *argv: str) -> str:
    code = main([*argv, f"log.dir={tmp_path / 'runs'}"] if argv[0] == "run" else list(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (tmp_path / "runs").exists()
    return lines[0]


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_an_alias_bomb_is_refused_at_once(tmp_path, capsys):
    start = time.perf_counter()
    line = error_of(tmp_path, capsys, "run", write(tmp_path, BOMB + QUICKSTART.read_text()))
    assert time.perf_counter() - start < 5 and f"more than {bounded.MAX_VALUES} values" in line


def test_an_alias_bomb_in_an_override_is_refused(tmp_path, capsys):
    bomb = "[" + ", ".join(["[" + ", ".join(["x"] * 200) + "]"] * 200) + "]"
    line = error_of(tmp_path, capsys, "run", str(QUICKSTART), f"model.hidden={bomb}")
    assert "model.hidden" in line and "values" in line


def test_a_self_referencing_alias_is_refused(tmp_path, capsys):
    line = error_of(tmp_path, capsys, "run", write(tmp_path, QUICKSTART.read_text() + "extra: &x [*x]\n"))
    assert "extra" in line


@pytest.mark.parametrize("deep", ["x: " + "[" * 600 + "]" * 600, "x: " + "{a: " * 600 + "1" + "}" * 600,
                                  "x:\n" + "".join("  " * i + "- \n" for i in range(1, 600))],
                         ids=["flow-list", "flow-map", "block"])
def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path, capsys, deep):
    line = error_of(tmp_path, capsys, "run", write(tmp_path, QUICKSTART.read_text() + deep + "\n"))
    assert f"nested deeper than {bounded.MAX_DEPTH}" in line


def test_deep_nesting_in_a_mapping_source_is_a_config_error():
    doc: dict = {}
    node = doc
    for _ in range(2000):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ConfigError, match="nested deeper"):
        load_config({"model": doc})


@pytest.mark.parametrize("text,path", [("optimizer: {name: sgd, lr: 0.5, lr: 0.9}\n", "optimizer.lr"),
                                       ("name: a\nname: b\n", "name"),
                                       ("train:\n  max_steps: 3\n  max_steps: 4\n", "train.max_steps")])
def test_a_duplicate_key_names_its_path(tmp_path, capsys, text, path):
    rest = QUICKSTART.read_text()
    for line in ("name: quickstart\n", "optimizer: {name: sgd, lr: 0.01}\n", "train:     {max_epochs: 20, max_steps: null}\n"):
        rest = rest.replace(line, "")  # the section the case gives twice, given only there
    line = error_of(tmp_path, capsys, "run", write(tmp_path, text + rest))
    assert line.startswith(f"error: {path}: key given twice")


def test_a_duplicate_key_in_an_override_names_its_path(tmp_path, capsys):
    line = error_of(tmp_path, capsys, "run", str(QUICKSTART), "optimizer={name: sgd, lr: 0.5, lr: 0.9}")
    assert line.startswith("error: optimizer.lr: key given twice")


def test_a_long_string_is_refused(tmp_path, capsys):
    line = error_of(tmp_path, capsys, "run", str(QUICKSTART), f"model.junk={'x' * (bounded.MAX_TEXT + 1)}")
    assert "model.junk" in line and "characters" in line


def test_a_file_over_the_size_bound_is_refused_unread(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(QUICKSTART.read_text() + "#" * bounded.MAX_BYTES)
    assert "bytes a config may have" in error_of(tmp_path, capsys, "run", str(path))


def test_hparams_values_are_cut_to_the_stated_bound(quick):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from trainer.logs import MAX_HPARAM_TEXT

    trainer = Trainer(quick("train.max_steps=2"))
    trainer.cfg.model.kwargs["note"] = ["x" * 1000] * 8  # what an unannotated keyword argument could carry
    run_dir = trainer.fit().run_dir
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert len(hparams["model.note"].string_value) == MAX_HPARAM_TEXT
    assert all(len(v.string_value) <= MAX_HPARAM_TEXT for v in hparams.values())


# (id, overrides, the path the error names, text in the message)
WRONG_ACCEPTS = [
    ("lr-inf", ["optimizer.lr=.inf"], "optimizer.lr", "finite"),
    ("lr-1e999", ["optimizer.lr=1e999"], "optimizer.lr", "finite"),
    ("lr-nan", ["optimizer.lr=.nan"], "optimizer.lr", "finite"),
    ("clip-inf", ["train.clip_grad_norm=.inf"], "train.clip_grad_norm", "finite"),
    ("onecycle-negative-max-lr", ["scheduler={name: onecycle, max_lr: -0.1}"], "scheduler.max_lr", "positive"),
    ("onecycle-pct", ["scheduler={name: onecycle, pct_start: 1.5}"], "scheduler.pct_start", "(0, 1)"),
    ("cosine-negative-min-lr", ["scheduler={name: cosine, min_lr: -0.1}"], "scheduler.min_lr", "0 or more"),
    ("cosine-min-lr-above-lr", ["scheduler={name: cosine, min_lr: 0.5}"], "scheduler.min_lr", "above"),
    ("step-size-0", ["scheduler={name: step, step_size: 0}"], "scheduler.step_size", "at least 1"),
    ("step-gamma", ["scheduler={name: step, gamma: -1}"], "scheduler.gamma", "positive"),
    ("multistep-milestone", ["scheduler={name: multistep, milestones: [0, 3]}"], "scheduler.milestones[0]",
     "at least 1"),
    ("plateau-factor", ["scheduler={name: plateau, factor: 2}"], "scheduler.factor", "(0, 1)"),
    ("plateau-train-loss", ["scheduler={name: plateau, monitor: train/loss}"], "scheduler.monitor", "val/loss"),
    ("rmsprop-alpha", ["optimizer={name: rmsprop, alpha: 2}"], "optimizer.alpha", "[0, 1]"),
    ("sgd-momentum", ["optimizer={name: sgd, momentum: 1.5}"], "optimizer.momentum", "[0, 1)"),
    ("sgd-dampening", ["optimizer={name: sgd, dampening: -1}"], "optimizer.dampening", "[0, 1]"),
    ("adam-eps", ["optimizer={name: adam, eps: 0}"], "optimizer.eps", "positive"),
    ("adam-betas", ["optimizer={name: adam, betas: [0.9, 1.0]}"], "optimizer.betas", "[0, 1)"),
    ("batch-above-maxsize", ["data.batch_size=99999999999999999999"], "data.batch_size", "at most"),
    ("seed-2-70", [f"seed={2**70}"], "seed", "at most"),
    ("seed-negative", ["seed=-1"], "seed", "[0, 2**63 - 1]"),
    ("name-300", [f"name={'n' * 300}"], "name", "up to 100"),
    ("reduction-none", ["loss.reduction=none"], "loss.reduction", "valid: mean, sum"),
    ("accuracy-on-regression", ["train.monitor=val/accuracy"], "train.monitor", "monitor val/loss"),
]


@pytest.mark.parametrize("overrides,path,text", [w[1:] for w in WRONG_ACCEPTS], ids=[w[0] for w in WRONG_ACCEPTS])
def test_out_of_range_values_are_one_error_line(tmp_path, capsys, overrides, path, text):
    line = error_of(tmp_path, capsys, "run", str(QUICKSTART), *overrides)
    assert line.startswith(f"error: {path}: ") and text in line, line


def test_a_name_with_a_nul_is_refused(tmp_path, capsys):
    text = QUICKSTART.read_text().replace("name: quickstart", 'name: "a\\0b"')
    assert error_of(tmp_path, capsys, "run", write(tmp_path, text)).startswith("error: name: ")


def test_tilde_in_log_dir_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(QUICKSTART, ["log.dir=~/runs"]).log.dir == str(tmp_path / "runs")


@pytest.mark.parametrize("folder,text", [("a\0b", "NUL"), ("x" * 300 + "/runs", "File name too long")],
                         ids=["nul", "name-too-long"])
def test_log_dir_that_cannot_be_a_folder_is_refused(folder, text):
    with pytest.raises(ConfigError, match=text):
        load_config({**yaml.safe_load(QUICKSTART.read_text()), "log": {"dir": folder}})


@pytest.mark.parametrize("below", ["", "/sub"], ids=["is-a-file", "under-a-file"])
def test_log_dir_that_is_a_file_is_refused(tmp_path, capsys, below):
    (tmp_path / "f").write_text("")
    assert main(["run", str(QUICKSTART), f"log.dir={tmp_path / 'f'}{below}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: log.dir: {tmp_path / 'f'} is a file")


MODULES = {
    "m_raise": ("raise RuntimeError('boom')\n", "raised RuntimeError: boom"),
    "m_syntax": ("def f(:\n", "raised SyntaxError (m_syntax.py, line 1)"),
    "m_dup": ("from trainer import optimizers\noptimizers.register('sgd')(lambda p: None)\n",
              "raised ValueError: optimizer 'sgd' is already registered"),
}


@pytest.mark.slow
@pytest.mark.parametrize("module", list(MODULES))
def test_a_broken_module_under_imports_is_one_error_line(tmp_path, module):
    source, text = MODULES[module]
    (tmp_path / f"{module}.py").write_text(source)
    proc = run_cli("run", str(QUICKSTART), f"imports=[{module}]", f"log.dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: imports[0]: importing '{module}' {text}"), proc.stderr


PARTS = textwrap.dedent("""
    import torch
    from trainer import datasets, losses

    @losses.register("mse_function")
    def mse_function(pred, target):
        return ((pred - target) ** 2).mean()

    @losses.register("returns_fn")
    def returns_fn():
        return mse_function

    @losses.register("per_sample")
    def per_sample():
        return lambda pred, target: (pred - target) ** 2

    class Triples(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return torch.randn(10), torch.randn(1), i

    @datasets.register("triples")
    def triples():
        return Triples()
""")


@pytest.fixture
def parts(tmp_path, monkeypatch):
    (tmp_path / "fault_parts.py").write_text(PARTS)
    monkeypatch.chdir(tmp_path)
    return ["imports=[fault_parts]"]


@pytest.mark.parametrize("override,path,text", [
    ("loss=mse_function", "loss.name", "registered as the loss function itself"),
    ("loss=per_sample", "loss", "returned shape (2, 1), but a training step backpropagates one number"),
    ("data=triples", "data.name", "a training sample is a 3-tuple"),
])
def test_user_parts_that_cannot_train_are_one_error_line(tmp_path, capsys, parts, override, path, text):
    line = error_of(tmp_path, capsys, "run", str(QUICKSTART), *parts, override)
    assert line.startswith(f"error: {path}: ") and text in line, line


def test_a_loss_factory_may_return_a_plain_function(quick, parts):
    result = Trainer(quick(*parts, "loss=returns_fn", "train.max_steps=3")).fit()
    assert result.step == 3 and result.metrics["train/loss"] > 0


def test_a_csv_with_a_text_cell_names_the_cell(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("a,b,y\n1,2,3\n4,x,5\n6,7,8\n")
    line = error_of(tmp_path, capsys, "run", str(QUICKSTART), "model.in_features=2",
                    f"data={{name: tensor_file, path: {tmp_path / 't.csv'}, target: y, val_fraction: 0}}")
    assert "column 'b', data row 2 is not a number" in line


@pytest.mark.slow
def test_reduction_none_in_a_real_process_writes_nothing(tmp_path):
    proc = run_cli("run", str(QUICKSTART), "loss.reduction=none", f"log.dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: loss.reduction: "), proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()
