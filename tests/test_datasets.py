"""Built-in datasets: shapes, seeded splits, and tensor_file's three formats."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer import ConfigError, datasets


def test_regression_split_is_seeded_and_disjoint():
    a, b = datasets.regression(seed=3), datasets.regression(seed=3)
    xa, ya = a["train"].tensors
    assert xa.shape == (820, 10) and ya.shape == (820, 1)
    assert torch.equal(xa, b["train"].tensors[0])
    assert len(a["val"]) == 204
    assert not torch.equal(xa, datasets.regression(seed=4)["train"].tensors[0])
    assert "val" not in datasets.regression(val_fraction=0.0)


@pytest.mark.parametrize("kind", ["blobs", "spirals"])
def test_classification_targets_are_class_indices(kind):
    data = datasets.classification(kind=kind, n_samples=300, n_classes=3)
    x, y = data["train"].tensors
    assert x.shape[1] == 2 and y.dtype == torch.long and set(y.tolist()) == {0, 1, 2}


def test_digits_is_real_and_bundled():
    pytest.importorskip("sklearn")
    data = datasets.digits(flatten=False)
    x, y = data["train"].tensors
    assert x.shape[1:] == (1, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0
    assert len(data["train"]) + len(data["val"]) == 1797 and set(y.tolist()) == set(range(10))


def write_all_formats(tmp_path, x: np.ndarray, label: np.ndarray):
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
    np.savetxt(tmp_path / "d.csv", np.column_stack([x, label]), delimiter=",", header=header, comments="")
    np.savez(tmp_path / "d.npz", **{f"f{i}": x[:, i] for i in range(x.shape[1])}, label=label)
    torch.save({**{f"f{i}": torch.from_numpy(x[:, i]) for i in range(x.shape[1])},
                "label": torch.from_numpy(label)}, tmp_path / "d.pt")


@pytest.mark.parametrize("suffix", ["csv", "npz", "pt"])
def test_tensor_file_reads_named_columns(tmp_path, suffix):
    rng = np.random.default_rng(0)
    x, label = rng.normal(size=(50, 3)), rng.integers(0, 4, size=50)
    write_all_formats(tmp_path, x, label)
    data = datasets.tensor_file(str(tmp_path / f"d.{suffix}"), target="label", features=["f2", "f0"],
                                target_dtype="long", val_fraction=0.0)
    xs, ys = data["train"].tensors
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(xs, torch.tensor(x[:, [2, 0]], dtype=torch.float32)[order])
    assert ys.dtype == torch.long and torch.equal(ys, torch.from_numpy(label)[order])


def test_tensor_file_float_target_is_a_column(tmp_path):
    x = np.arange(20.0).reshape(10, 2)
    write_all_formats(tmp_path, x, x.sum(1))
    xs, ys = datasets.tensor_file(str(tmp_path / "d.npz"), target="label", val_fraction=0.0)["train"].tensors
    assert xs.shape == (10, 2) and ys.shape == (10, 1) and ys.dtype == torch.float32


def test_tensor_file_names_a_missing_column(tmp_path):
    write_all_formats(tmp_path, np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(ConfigError) as e:
        datasets.tensor_file(str(tmp_path / "d.csv"), target="lable")
    assert e.value.path == "target" and "'label'" in e.value.suggestion
    with pytest.raises(ConfigError) as e:
        datasets.tensor_file(str(tmp_path / "d.csv"), target="label", features=["f0", "f9"])
    assert e.value.path == "features[1]"


class _Rows(torch.utils.data.Dataset):
    """A user's dataset: one sample per integer index, nothing else."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if not isinstance(i, int):
            raise TypeError(f"one index at a time, got {type(i).__name__}")
        return self.x[i], self.y[i]


@pytest.mark.parametrize("kind", ["tensors", "subset", "user", "torch-tensordataset"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_batches_equal_a_per_sample_dataloader(kind, drop_last):
    """Gathered batches (the built-ins' Tensors) are bit for bit a per-sample DataLoader's; others are collated."""
    from torch.utils.data import DataLoader, RandomSampler, Subset, TensorDataset

    from trainer.data import collate

    x, y = torch.randn(103, 5), torch.randint(0, 3, (103,))
    order = list(range(100, 0, -1))
    ds, ref = {"tensors": (datasets.Tensors(x, y), TensorDataset(x, y)),
               "subset": (Subset(datasets.Tensors(x, y), order), Subset(TensorDataset(x, y), order)),
               "user": (_Rows(x, y), _Rows(x, y)),
               "torch-tensordataset": (TensorDataset(x, y), TensorDataset(x, y))}[kind]
    seen = []

    def spy(samples):
        seen.append(isinstance(samples, datasets.Batch))
        return collate(samples)

    ours = DataLoader(ds, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(3)), batch_size=16,
                      drop_last=drop_last, collate_fn=spy)
    plain = DataLoader(ref, sampler=RandomSampler(ref, generator=torch.Generator().manual_seed(3)), batch_size=16,
                       drop_last=drop_last)  # per sample, default_collate
    got, want = list(ours), list(plain)
    assert len(got) == len(want) == (len(ds) // 16 if drop_last else -(-len(ds) // 16))
    assert seen == [kind in ("tensors", "subset")] * len(got)  # gathered whole, or collated sample by sample
    for (gx, gy), (wx, wy) in zip(got, want):
        assert torch.equal(gx, wx) and torch.equal(gy, wy) and gx.dtype == wx.dtype


def test_builtin_datasets_gather_and_the_trainer_loader_is_a_plain_dataloader(quick):
    from trainer import Trainer
    from trainer.data import ResumableSampler

    assert all(isinstance(d, datasets.Tensors) for d in datasets.regression().values())
    trainer = Trainer(quick())
    loader = trainer.train_loader
    assert isinstance(loader.sampler, ResumableSampler) and loader.batch_size == trainer.cfg.data.batch_size
