"""The training loop against hand-written loops, and its stopping, accumulation, scheduling and resume."""
from __future__ import annotations

import signal

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from trainer import ConfigError, Trainer, datasets
from conftest import StopAt
from trainer.loop import Interrupted, NonFiniteLoss


def hand_written_sgd(steps: int, batch_size: int = 64, lr: float = 0.01, clip: float | None = None) -> nn.Module:
    """The seed article's loop, written out: same init, same data order, plain SGD."""
    torch.manual_seed(0)
    model = nn.Linear(10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = datasets.regression()["train"].tensors
    step, epoch = 0, 0
    while step < steps:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))  # seed + epoch
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            loss = F.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            step += 1
            if step == steps:
                return model
        epoch += 1
    return model


@pytest.mark.parametrize("clip", [None, 0.5])
def test_parameters_equal_a_hand_written_loop(quick, clip):
    steps = 30  # 13 batches an epoch: crosses two epoch boundaries, reshuffling each time
    overrides = [f"train.max_steps={steps}", "train.max_epochs=null"]
    trainer = Trainer(quick(*overrides, f"train.clip_grad_norm={clip if clip else 'null'}"))
    result = trainer.fit()
    expected = hand_written_sgd(steps, clip=clip)
    assert result.step == steps
    for (name, p), q in zip(trainer.model.named_parameters(), expected.parameters()):
        assert torch.equal(p, q), name



def test_worker_processes_give_the_same_parameters(quick):
    """Batches gathered by 2 DataLoader worker processes train exactly as in-process ones."""
    steps = ["train.max_steps=20", "train.max_epochs=null"]
    ref = Trainer(quick(*steps))
    ref.fit()
    workers = Trainer(quick(*steps, "data.num_workers=2"))
    assert workers.train_loader.num_workers == 2
    workers.fit()
    for (name, p), q in zip(workers.model.named_parameters(), ref.model.parameters()):
        assert torch.equal(p, q), name

def test_accumulation_equals_one_larger_batch(quick):
    common = ["train.max_steps=6", "train.max_epochs=null", "data.shuffle=false", "optimizer.name=sgd",
              "data.drop_last=true"]
    big = Trainer(quick(*common, "data.batch_size=64"))
    big.fit()
    small = Trainer(quick(*common, "data.batch_size=16", "train.accumulate=4"))
    small.fit()
    assert small.step == big.step == 6
    for p, q in zip(small.model.parameters(), big.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    moved = Trainer(quick(*common, "data.batch_size=16"))
    moved.fit()  # without accumulation the same number of steps sees a quarter of the data: different
    assert not torch.allclose(moved.model.weight, big.model.weight)


def test_gradient_accumulators_live_from_step_to_step(quick):
    """As in a hand-written loop, whose ``loss`` lives until the next step: a hook on a parameter's gradient
    accumulator, added after one step, still fires in the next (were the graph dropped, a new one would be built)."""
    trainer = Trainer(quick("data.shuffle=false"))
    batch = [next(iter(trainer.train_loader))]
    trainer.train_step(batch)
    fired = []
    accumulator = trainer.model.weight.view_as(trainer.model.weight).grad_fn.next_functions[0][0]
    accumulator.register_hook(lambda *grads: fired.append(True))
    del accumulator  # only the trainer's graph may keep it alive
    trainer.train_step(batch)
    assert fired


def test_stops_at_max_epochs_or_max_steps_whichever_first(quick):
    t = Trainer(quick("train.max_epochs=2", "train.max_steps=100"))
    assert t.fit().step == 2 * 13 and t.epoch == 2
    t = Trainer(quick("train.max_epochs=2", "train.max_steps=5"))
    assert t.fit().step == 5 and t.epoch == 0


def test_schedulers_step_at_their_interval(quick):
    t = Trainer(quick("scheduler={name: step, step_size: 1, gamma: 0.5}", "train.max_epochs=2"))
    t.fit()
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)  # per epoch
    t = Trainer(quick("scheduler={name: cosine, warmup_steps: 3, min_lr: 0.001}", "train.max_epochs=2"))
    lrs = []
    t.on_step = lambda: lrs.append(t.optimizer.param_groups[0]["lr"])
    t.fit()
    assert lrs[0] == pytest.approx(0.01 * 2 / 3) and lrs[1] == pytest.approx(0.01)  # per step warmup
    assert lrs[-1] == pytest.approx(0.001)
    t = Trainer(quick("scheduler={name: plateau, patience: 0, factor: 0.5, threshold: 10.0}", "train.max_epochs=3"))
    t.fit()
    assert t.optimizer.param_groups[0]["lr"] < 0.01  # no relative improvement of 1000%: cut after each check


def test_classification_reports_accuracy(quick):
    from conftest import ROOT
    cfg = quick("train.max_epochs=3", "data.kind=blobs", "data.n_samples=600",
                source=ROOT / "configs" / "classification.yaml")
    result = Trainer(cfg).fit()
    assert result.metrics["val/accuracy"] > 0.9
    assert result.metrics["val/loss"] < 0.5


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(quick):
    t = Trainer(quick("train.max_steps=20", "train.checkpoint_every=2", "log.every=3"))
    real = t.loss_fn
    calls = []

    def poisoned(out, y):
        calls.append(1)
        loss = real(out, y)
        return loss * float("nan") if len(calls) == 5 else loss

    t.loss_fn = poisoned
    with pytest.raises(NonFiniteLoss) as e:
        t.fit()
    assert e.value.step == 5
    state = torch.load(t.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_skip_nonfinite_skips_and_counts(quick):
    t = Trainer(quick("train.max_steps=10", "train.skip_nonfinite=true", "log.every=5"))
    real, calls = t.loss_fn, []

    def poisoned(out, y):
        calls.append(1)
        return real(out, y) * (float("inf") if len(calls) in (3, 4) else 1.0)

    t.loss_fn = poisoned
    result = t.fit()
    assert result.step == 10 and t._skipped == 2
    assert all(torch.isfinite(p).all() for p in t.model.parameters())



def test_skip_nonfinite_still_refuses_to_checkpoint_nonfinite_weights(quick):
    """A non-finite grad leaves its step's loss finite (nothing to skip) but poisons the weights."""
    t = Trainer(quick("train.max_steps=10", "train.skip_nonfinite=true", "train.checkpoint_every=2",
                      "log.every=5"))
    weight = next(t.model.parameters())
    weight.register_hook(lambda g: g * float("nan") if t.step == 2 else g)  # during step 3
    with pytest.raises(NonFiniteLoss, match="the weights are nan"):
        t.fit()
    state = torch.load(t.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())

def test_checkpoint_is_plain_and_loads_with_weights_only(quick):
    t = Trainer(quick("model={name: mlp, in_features: 10, out_features: 1, hidden: [8]}", "train.max_epochs=1",
                      "layers.default=custom"))
    result = t.fit()
    state = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "step", "scheduler", "epoch", "rng"} <= set(state)
    assert set(state["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # no module. prefix
    assert state["step"] == 13
    fresh = Trainer(quick("model={name: mlp, in_features: 10, out_features: 1, hidden: [8]}"))
    fresh.model.load_state_dict(state["model"])


def test_runs_never_overwrite(quick):
    a = Trainer(quick("train.max_steps=1")).fit().run_dir
    b = Trainer(quick("train.max_steps=1")).fit().run_dir
    assert (a.name, b.name) == ("version_0", "version_1") and a.parent == b.parent
    assert (a / "config.yaml").read_text() != "" and (b / "checkpoints" / "last.pt").is_file()


RESUMABLE = ["model={name: mlp, in_features: 10, out_features: 1, hidden: [16, 16], dropout: 0.2}",
             "optimizer={name: adam, lr: 0.01}", "scheduler={name: cosine, warmup_steps: 4}",
             "data.batch_size=100", "train.max_epochs=3", "layers.default=custom"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1], ids=["INT", "USR1"])
def test_resume_mid_epoch_is_bit_exact(quick, sig):
    whole = Trainer(quick(*RESUMABLE))
    whole.fit()
    first = StopAt(quick(*RESUMABLE))
    first.at, first.sig = 13, sig  # 9 batches an epoch: mid second epoch; SIGUSR1: slurm's pre-emption warning
    with pytest.raises(Interrupted) as e:
        first.fit()
    assert e.value.signum == sig
    saved = torch.load(first.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["batch_in_epoch"]) == (13, 1, 4)
    resumed = Trainer(quick(*RESUMABLE), resume=first.run_dir)
    result = resumed.fit()
    assert result.run_dir == first.run_dir and result.step == whole.step
    for (name, p), q in zip(resumed.model.named_parameters(), whole.model.parameters()):
        assert torch.equal(p, q), name


def test_an_optimizer_change_on_resume_is_what_runs_or_is_refused(quick):
    first = Trainer(quick("optimizer={name: adam, lr: 0.01}", "train.max_epochs=1"))
    first.fit()
    changed = Trainer(quick("optimizer={name: adam, lr: 0.05, weight_decay: 0.1, betas: [0.8, 0.99]}",
                            "train.max_epochs=2"), resume=first.run_dir)
    group = changed.optimizer.param_groups[0]  # restored from the checkpoint, then the new values
    assert (group["lr"], group["weight_decay"], group["betas"]) == (0.05, 0.1, (0.8, 0.99))
    assert changed.optimizer.state  # Adam's moments came back from the checkpoint
    changed.checkpoints.close()
    with pytest.raises(ConfigError, match="optimizer.name"):
        Trainer(quick("optimizer={name: sgd, lr: 0.01}", "train.max_epochs=2"), resume=first.run_dir)
    scheduled = Trainer(quick("optimizer={name: adam, lr: 0.01}", "scheduler={name: cosine}", "train.max_epochs=1"))
    scheduled.fit()
    with pytest.raises(ConfigError, match="optimizer.lr"):
        Trainer(quick("optimizer={name: adam, lr: 0.5}", "scheduler={name: cosine}", "train.max_epochs=2"),
                resume=scheduled.run_dir)


def test_a_checkpoint_holds_the_config_yaml_and_a_config_dict_resumes_too(quick):
    """The config is kept as config.yaml's text; a checkpoint holding it as a dict resumes the same way."""
    first = Trainer(quick("optimizer={name: adam, lr: 0.01}", "train.max_epochs=1"))
    first.fit()
    last = first.run_dir / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["config"] == (first.run_dir / "config.yaml").read_text()
    state["config"] = first.cfg.to_dict()
    torch.save(state, last)
    (first.run_dir / "checkpoints" / "manifest.json").unlink()  # no checksum to compare the edited file with
    changed = Trainer(quick("optimizer={name: adam, lr: 0.05}", "train.max_epochs=2"), resume=first.run_dir)
    assert changed.step == first.step and changed.optimizer.param_groups[0]["lr"] == 0.05
    changed.checkpoints.close()
    with pytest.raises(ConfigError, match="optimizer.name"):
        Trainer(quick("optimizer={name: sgd, lr: 0.01}", "train.max_epochs=2"), resume=first.run_dir)
