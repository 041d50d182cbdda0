"""Mixed precision and torch.compile in real training runs, twins included."""
from __future__ import annotations

import glob

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer import Trainer

MODEL = "model={name: mlp, in_features: 10, out_features: 1, hidden: [32, 32], activation: gelu, layer_norm: true}"


def losses(run_dir) -> list[float]:
    acc = EventAccumulator(glob.glob(str(run_dir / "events.out.tfevents.*"))[0], size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


def test_bf16_autocast_trains_with_twins_like_native(quick):
    runs = {}
    for impl in ("native", "custom"):
        t = Trainer(quick(MODEL, "train.precision=bf16", f"layers.default={impl}", "train.max_steps=30",
                          "train.max_epochs=null", "log.every=5", "optimizer={name: adam, lr: 0.003}"))
        result = t.fit()
        runs[impl] = (t, losses(result.run_dir))
    (tn, ln), (tc, lc) = runs["native"], runs["custom"]
    assert ln[-1] < ln[0]  # it trains in bf16
    torch.testing.assert_close(torch.tensor(lc), torch.tensor(ln), rtol=3e-2, atol=1e-2)  # bf16 tolerance
    for p, q in zip(tc.model.parameters(), tn.model.parameters()):
        assert p.dtype == q.dtype == torch.float32  # autocast keeps fp32 master weights
        torch.testing.assert_close(p, q, rtol=5e-2, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("task", [[MODEL], ["model={name: mlp, in_features: 10, out_features: 3, hidden: [32], "
                                            "activation: silu}", "data={name: classification, n_features: 10, "
                                            "n_classes: 3}", "loss={name: cross_entropy, label_smoothing: 0.1}"]],
                         ids=["mse", "cross_entropy"])
def test_compiled_run_follows_the_eager_loss_curve(quick, task):
    curves = {}
    for compiled in (False, True):
        trainer = Trainer(quick(*task, "layers.default=custom", f"train.compile={str(compiled).lower()}",
                                "train.max_steps=20", "train.max_epochs=null", "log.every=2"))
        curves[compiled] = losses(trainer.fit().run_dir)
        # the model and the loss (a twin) are both compiled
        assert [type(m).__name__ == "OptimizedModule" for m in (trainer.net, trainer.loss)] == [compiled] * 2
    torch.testing.assert_close(torch.tensor(curves[True]), torch.tensor(curves[False]), rtol=1e-5, atol=1e-5)
