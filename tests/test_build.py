"""The builder is public API: its parts, trained by a hand-written loop, end where ``Trainer.fit`` ends, bit for bit."""
from __future__ import annotations

import pytest
import torch

from trainer import ConfigError, Trainer
from trainer.build import Parts, build

TASK = ["model={name: mlp, in_features: 10, out_features: 1, hidden: [16], activation: gelu, dropout: 0.2}",
        "optimizer={name: adam, lr: 0.01}", "scheduler={name: cosine, warmup_steps: 5}",
        "train.max_steps=30", "train.max_epochs=null"]


def hand_written_loop(parts: Parts, steps: int) -> None:
    """What a user writes around the parts: the plain loop, epoch after epoch, no Trainer."""
    step, epoch = 0, 0
    while step < steps:
        parts.sampler.set_epoch(epoch)  # the order of an epoch depends on (seed, epoch) only
        for x, y in parts.train_loader:
            parts.optimizer.zero_grad(set_to_none=True)
            with parts.autocast:
                loss = parts.loss(parts.model(x.to(parts.device)), y.to(parts.device))
            loss.backward()
            parts.optimizer.step()
            parts.scheduler.step()  # cosine steps per optimizer step
            step += 1
            if step == steps:
                return
        epoch += 1


@pytest.mark.parametrize("impl", ["native", "custom"])
def test_parts_in_a_hand_written_loop_end_where_fit_ends(quick, impl):
    # 13 batches an epoch: 30 steps cross two epoch boundaries (and a validation each), with dropout
    cfg = quick(*TASK, f"layers.default={impl}")
    parts = build(cfg)
    assert parts.steps_per_epoch == 13 and parts.total_steps == 30 and parts.scheduler.interval == "step"
    hand_written_loop(parts, 30)
    trainer = Trainer(cfg)
    trainer.fit()
    assert trainer.step == 30
    for (name, p), q in zip(trainer.model.state_dict().items(), parts.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_build_makes_no_trainer_and_writes_nothing(quick, tmp_path):
    parts = build(quick())
    assert isinstance(parts.model, torch.nn.Module) and parts.val_loader is not None
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides,path", [
    (["data.val_fraction=0", "train.monitor=val/loss"], "train.monitor"),
    (["data.val_fraction=0", "scheduler={name: plateau}"], "scheduler.name"),
    (["data.n_samples=10", "data.batch_size=64", "data.drop_last=true"], "data.batch_size"),
    (["train.precision=16"], "train.precision"),
    (["compare.every=5"], "compare.every"),  # shadow mode with no layer running its twin
])
def test_config_checks_that_need_the_parts_are_the_builders(quick, overrides, path):
    with pytest.raises(ConfigError) as e:
        build(quick(*overrides))
    assert e.value.path == path
