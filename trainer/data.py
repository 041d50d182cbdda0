"""Data loaders that can resume mid-epoch: a seeded per-epoch order that can skip the batches already seen.

In-memory tensor datasets (every built-in) are fetched a batch at a time: the loader hands the
dataset a list of indices and gets the batch from one gather per tensor, instead of
``batch_size`` calls to ``__getitem__`` and a collate. The batches are the same, bit for bit.
"""
from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler, Subset, TensorDataset

from trainer.config import DataConfig
from trainer.distributed import Env


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (order = seed + epoch, a shard per rank) that can skip its first ``skip`` samples.

    The order of an epoch depends on nothing but (seed, epoch), so a checkpoint needs only
    the epoch and the number of batches already taken to resume the same sequence.
    """

    def __init__(self, dataset: Dataset, env: Env, *, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


def gathers(dataset: Dataset) -> bool:
    """True for a TensorDataset (or a Subset of one): indexing it with a list of indices gives a whole batch.

    Only where ``__getitem__`` is torch's own: a subclass that overrides it (per-sample augmentation,
    say) expects one index at a time.
    """
    while type(dataset).__getitem__ is Subset.__getitem__:
        dataset = dataset.dataset
    return type(dataset).__getitem__ is TensorDataset.__getitem__


def loader(dataset: Dataset, sampler: Sampler, batch_size: int, drop_last: bool, **common) -> DataLoader:
    """A DataLoader over ``sampler``'s order: a gather per batch where the dataset allows it, else per sample."""
    if gathers(dataset):  # batch_size=None: the dataset gets BatchSampler's index lists as they are
        return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last), batch_size=None, **common)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, drop_last=drop_last, **common)


def loaders(train: Dataset, val: Dataset | None, cfg: DataConfig, env: Env, seed: int
            ) -> tuple[DataLoader, ResumableSampler, DataLoader | None]:
    """The training loader (with its sampler, for ``set_epoch``/``skip``) and the validation loader."""
    sampler = ResumableSampler(train, env, shuffle=cfg.shuffle, seed=seed)
    pin = env.device.type == "cuda"
    # A generator of its own keeps each new iterator from drawing on the global RNG (resume stays exact).
    common = dict(num_workers=cfg.num_workers, pin_memory=pin, generator=torch.Generator(),
                  persistent_workers=cfg.num_workers > 0)
    train_loader = loader(train, sampler, cfg.batch_size, cfg.drop_last, **common)
    val_loader = None
    if val is not None and len(val):
        val_sampler = DistributedSampler(val, num_replicas=env.world_size, rank=env.rank, shuffle=False)
        val_loader = loader(val, val_sampler, cfg.batch_size, False, **common)
    return train_loader, sampler, val_loader
