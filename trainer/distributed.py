"""DistributedDataParallel plumbing: process group from torchrun's environment, device choice, rank-0 helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.errors import ConfigError


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str) -> Env:
    """Join torchrun's process group if there is one (gloo on CPU, nccl on CUDA) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device", f"{device!r} asked for, but this machine has no CUDA device",
                          suggestion="use device: auto or cpu")
    use_cuda = device.startswith("cuda") or device == "auto" and torch.cuda.is_available()
    if not use_cuda:
        dev = torch.device("cpu")
    elif world > 1 or device in ("auto", "cuda"):
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    else:
        dev = torch.device(device)
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # torch.distributed.nn and its kin bind `group=group.WORLD` defaults when first imported, which
        # torch._dynamo does on an optimizer's first use: imported after the group exists, they hold it past
        # destroy_process_group, and at interpreter exit gloo's worker thread, still releasing the last
        # collective's tensors, finds no GIL and aborts the process. Imported first, they hold nothing.
        from torch import _dynamo  # noqa: F401

        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Env(rank, world, local, dev)


def wrap(model: nn.Module, env: Env) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else itself."""
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def broadcast(obj: Any, env: Env) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: torch.Tensor, env: Env) -> torch.Tensor:
    """The sum of ``values`` over all ranks (the tensor itself on one process)."""
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


def any_rank(flag: bool, env: Env) -> bool:
    """True on every rank if it is True on any (so all ranks stop together)."""
    if not env.distributed:
        return flag
    t = torch.tensor([float(flag)], device=env.device)
    dist.all_reduce(t)
    return bool(t.item())
