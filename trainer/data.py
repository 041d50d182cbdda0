"""Data loaders that can resume mid-epoch: a seeded per-epoch order that can skip the batches already seen.

A dataset with a ``__getitems__`` that returns a ``trainer.datasets.Batch`` (every built-in
does) hands the loader whole batches; ``collate`` passes them as they are and collates
anything else as a plain DataLoader does.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from itertools import islice

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from trainer.config import DataConfig
from trainer.datasets import Batch
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


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's start: stop signals sent to the whole process group are for the main process.

    Ctrl-C, slurm and systemd signal every process of a job; the main process finishes its step,
    saves and shuts the workers down itself. So a worker ignores SIGINT and SIGUSR1 and obeys SIGTERM
    only from its parent (the DataLoader's and multiprocessing's own shutdown): SIGTERM stays blocked,
    and a thread takes each one with its sender's pid.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # slurm's pre-emption warning, also for the main process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_obey_parent_sigterm, args=(os.getppid(),), daemon=True).start()


def _obey_parent_sigterm(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # the default action: the worker ends by SIGTERM


def collate(samples: list | Batch):
    """A Batch a dataset gathered whole (``Tensors.__getitems__``) as it is; a list of samples collated."""
    return samples if isinstance(samples, Batch) else default_collate(samples)


def loaders(train: Dataset, val: Dataset | None, cfg: DataConfig, env: Env, seed: int
            ) -> tuple[DataLoader, ResumableSampler, DataLoader | None]:
    """The training loader (with its sampler, for ``set_epoch``/``skip``) and the validation loader."""
    sampler = ResumableSampler(train, env, shuffle=cfg.shuffle, seed=seed)
    pin = env.device.type == "cuda"
    # A generator of its own keeps each new iterator from drawing on the global RNG (resume stays exact).
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=pin, collate_fn=collate,
                  generator=torch.Generator(), persistent_workers=cfg.num_workers > 0,
                  worker_init_fn=ignore_stop_signals if cfg.num_workers > 0 else None)
    train_loader = DataLoader(train, sampler=sampler, drop_last=cfg.drop_last, **common)
    val_loader = None
    if val is not None and len(val):
        val_sampler = DistributedSampler(val, num_replicas=env.world_size, rank=env.rank, shuffle=False)
        val_loader = DataLoader(val, sampler=val_sampler, **common)
    return train_loader, sampler, val_loader
