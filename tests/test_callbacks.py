"""The loop's extension point: callbacks run around every step, and the examples in docs/architecture.md run."""
from __future__ import annotations

import glob
import re
import shutil

import pytest
import torch
from conftest import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer import Callback, Trainer
from trainer.loop import NonFiniteLoss

DOC = ROOT / "docs" / "architecture.md"


def doc_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def before_step(self, trainer):
        self.events.append(("before", trainer.step))

    def after_step(self, trainer, loss):
        assert loss.shape == () and not loss.requires_grad
        self.events.append(("after", trainer.step))

    def on_error(self, trainer, error):
        self.events.append(("error", type(error).__name__))

    def on_end(self, trainer):
        self.events.append(("end", trainer.step))


def test_callbacks_run_around_each_step_and_at_the_end(quick):
    rec = Recorder()
    Trainer(quick("train.max_steps=3", "train.max_epochs=null"), callbacks=[rec]).fit()
    assert rec.events == [("before", 0), ("after", 1), ("before", 1), ("after", 2), ("before", 2), ("after", 3),
                          ("end", 3)]


def test_a_callback_sees_the_error_that_stops_the_run(quick):
    rec = Recorder()
    t = Trainer(quick("train.max_steps=5", "train.max_epochs=null"), callbacks=[rec])
    real = t.loss_fn
    t.loss_fn = lambda out, y: real(out, y) * float("nan")
    with pytest.raises(NonFiniteLoss):
        t.fit()
    assert rec.events[-1] == ("error", "NonFiniteLoss")


def test_no_callback_is_attached_unless_asked_for(quick):
    assert Trainer(quick()).callbacks == []  # native layers, no compare.every: the loop runs bare


def test_the_per_step_example_of_the_architecture_doc_logs_its_scalar(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "quickstart.yaml", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    example = doc_examples()[0]
    assert "class WeightNorm(Callback)" in example
    exec(compile(example, str(DOC), "exec"), {"__name__": "doc_example"})
    acc = EventAccumulator(glob.glob(str(tmp_path / "runs" / "quickstart" / "version_0" / "events.*"))[0],
                           size_guidance={"scalars": 0})
    acc.Reload()
    norms = acc.Scalars("custom/weight_norm")
    assert [e.step for e in norms] == [20, 40, 60]
    assert all(e.value > 0 for e in norms)


def test_the_builder_example_of_the_architecture_doc_trains(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "quickstart.yaml", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "doc_example"}
    exec(compile(doc_examples()[1], str(DOC), "exec"), scope)
    assert torch.isfinite(scope["loss"]) and not (tmp_path / "runs").exists()  # the builder writes nothing
