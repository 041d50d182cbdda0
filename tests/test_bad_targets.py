"""A class index out of range that shows only mid-run: one line naming the step, epoch, batch, value and range."""
from __future__ import annotations

import pytest
import torch

from conftest import ROOT, run_cli
from trainer import Trainer, datasets, load_config
from trainer.targets import BadTargets, first_bad, on_host
from trainer.twins.losses import CustomCrossEntropyLoss

BAD_ROW, BAD_VALUE = 100, 5


@pytest.fixture
def bad_data(tmp_path):
    """256 samples of 3 classes, one of them labelled 5; the first ones (the fit check's) are fine."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 2, generator=g), torch.randint(0, 3, (256,), generator=g)
    y[BAD_ROW] = BAD_VALUE
    path = tmp_path / "data.pt"
    torch.save({"a": x[:, 0].clone(), "b": x[:, 1].clone(), "y": y}, path)
    return path


def bad_batch(data) -> int:
    """The batch (of 16, no shuffle) that holds the bad row, wherever the dataset's split put it."""
    train = datasets.get("tensor_file")(path=str(data), target="y", val_fraction=0)["train"]
    return next(i for i in range(16) if (train.tensors[1][i * 16:(i + 1) * 16] == BAD_VALUE).any())


def overrides(tmp_path, data) -> list[str]:
    return [f"log.dir={tmp_path / 'runs'}", f"data={{name: tensor_file, path: {data}, target: y, val_fraction: 0}}",
            "data.batch_size=16", "data.shuffle=false", "train.checkpoint_every=1", "train.max_epochs=2",
            "log.progress=false"]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["native", "custom"])
def test_a_class_index_out_of_range_mid_run_is_one_line_naming_step_batch_value_and_range(tmp_path, bad_data, impl):
    proc = run_cli("run", str(ROOT / "configs" / "classification.yaml"), *overrides(tmp_path, bad_data),
                   f"layers.default={impl}")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    batch = bad_batch(bad_data)
    run_dir = tmp_path / "runs" / "classification" / "version_0"
    assert proc.stderr.startswith(
        f"error: step {batch + 1} (epoch 1, batch {batch} of the epoch, from 0): the targets hold class index "
        f"{BAD_VALUE}, but the model gives 3 classes, so targets must be in [0, 2]; stopped, the last good "
        f"checkpoint is kept"), proc.stderr
    assert f"to resume: trainer run --resume {run_dir}]" in proc.stderr
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == batch  # the step before the bad batch, kept


def test_the_twin_refuses_a_class_index_out_of_range_as_native_does():
    x, t = torch.randn(4, 3), torch.tensor([0, 2, 3, 1])
    with pytest.raises(IndexError, match="Target 3 is out of bounds"):
        torch.nn.CrossEntropyLoss()(x, t)
    with pytest.raises(IndexError, match="Target 3 is out of bounds"):
        CustomCrossEntropyLoss()(x, t)
    ignored = torch.tensor([0, 2, -100, 1])  # ignore_index is not out of range
    assert torch.allclose(CustomCrossEntropyLoss()(x, ignored), torch.nn.CrossEntropyLoss()(x, ignored))


def test_ignore_index_is_not_a_bad_target():
    assert first_bad(torch.tensor([0, -100, 2]), 3, -100) is None
    assert first_bad(torch.tensor([0, -1, 2]), 3, -100) == -1
    assert first_bad(torch.tensor([0, 1, 3]), 3, None) == 3


def test_the_host_side_check_names_the_batch_before_it_reaches_the_device(tmp_path, bad_data):
    """The check CUDA runs uses (there a bad index would be a device-side assert), run here on the CPU."""
    trainer = Trainer(load_config(ROOT / "configs" / "classification.yaml", overrides(tmp_path, bad_data)))
    trainer.step, trainer.batch_in_epoch = 3, 3  # as after three steps: the batches from the fourth on
    trainer.sampler.skip = 3 * 16
    with pytest.raises(BadTargets) as e:
        for _ in on_host(trainer, iter(trainer.train_loader)):
            trainer.step += 1
    assert (e.value.batch, e.value.value, e.value.classes) == (bad_batch(bad_data), BAD_VALUE, 3)
    assert e.value.step == e.value.batch + 1
    assert "no checkpoint had been saved yet" in str(e.value)


def test_the_host_side_check_leaves_a_loss_that_reads_no_class_indices_alone(tmp_path, bad_data):
    """Integer targets mean class indices only to a loss with ``ignore_index``; a user's own loss is not second-guessed."""
    trainer = Trainer(load_config(ROOT / "configs" / "classification.yaml", overrides(tmp_path, bad_data)))
    trainer.loss_fn = lambda out, y: out.sum() * 0  # reads no class index: the "bad" value is its business
    batches = list(iter(trainer.train_loader))
    assert len(list(on_host(trainer, iter(batches)))) == len(batches)
