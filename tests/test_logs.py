"""TensorBoard output read back with tensorboard's own EventAccumulator."""
from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer import Trainer


def events(run_dir) -> EventAccumulator:
    files = list(run_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # hparams live in the same event file, not a sub-run
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_config_and_hparams_are_written(quick):
    result = Trainer(quick("train.max_epochs=4", "log.every=5", "optimizer.lr=0.05")).fit()
    acc = events(result.run_dir)
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_sec", "val/loss"} <= tags
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == [*range(5, 4 * 13, 5), 52]  # and the last step
    assert loss[-1] < loss[0] / 2  # it learns
    assert len(acc.Scalars("val/loss")) == 4  # once per epoch
    assert all(abs(e.value - 0.05) < 1e-8 for e in acc.Scalars("train/lr"))  # stored as float32
    assert "config/text_summary" in acc.Tags()["tensors"]
    assert "optimizer" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    hp = acc.summary_metadata  # the HParams plugin's session entries are in this run's own file
    plugins = {m.plugin_data.plugin_name for m in hp.values()}
    assert "hparams" in plugins
    assert abs(result.metrics["val/loss"] - acc.Scalars("val/loss")[-1].value) < 1e-7


def test_histograms_and_graph_when_asked(quick):
    result = Trainer(quick("train.max_steps=6", "log.histograms_every=3", "log.graph=true",
                           "model={name: mlp, in_features: 10, out_features: 1, hidden: [4]}")).fit()
    acc = events(result.run_dir)
    hist = set(acc.Tags()["histograms"])
    assert {"weights/0.weight", "grads/0.weight", "weights/2.bias"} <= hist
    assert [e.step for e in acc.Histograms("weights/0.weight")] == [3, 6]
    assert acc.Tags()["graph"]


def test_no_histograms_or_graph_by_default(quick):
    acc = events(Trainer(quick("train.max_steps=3")).fit().run_dir)
    assert not acc.Tags()["histograms"] and not acc.Tags()["graph"]


def test_validation_every_n_steps(quick):
    acc = events(Trainer(quick("train.max_steps=20", "train.val_every=8")).fit().run_dir)
    assert [e.step for e in acc.Scalars("val/loss")] == [8, 16, 20]  # and once more at the end
