"""The training state copied to host memory, on the training thread, before a checkpoint is written in the background.

The copy is what an asynchronous save costs the step, so it is kept to the tensor copies themselves:
plain values are shared rather than copied (they are immutable), containers are walked without
``copy`` machinery when they are plain ``dict``/``list``/``tuple``, and the host storages of the
previous snapshot are reused (``HostBuffers``): at most one write is in flight and the next save
waits for it, so by then nothing reads them any more.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

# immutable: the snapshot may share them with the live state (pickle writes them by value)
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_PLAIN_TYPES = frozenset(_PLAIN)


def host_copy(obj: Any, memo: dict | None = None, reuse: dict[int, torch.UntypedStorage] | None = None) -> Any:
    """``obj`` with every tensor copied to host memory: nothing in the copy changes when training goes on.

    Tensors that shared a storage (tied weights, views) share one copied storage, an object met
    twice is copied once, and containers keep their types and attributes (a state_dict's
    ``_metadata``), so ``torch.save`` writes the same bytes for the copy as for the original.

    Args:
        obj: a state dict (or any nesting of containers, tensors and plain values).
        memo: filled with what was copied; ``("storage", key)`` entries are the copied storages.
        reuse: host storages to copy into instead of allocating, by the source storage's key
            (``HostBuffers`` passes the previous snapshot's); one whose size differs is not used.
    """
    return _copy(obj, {} if memo is None else memo, {} if reuse is None else reuse)


def _copy(obj: Any, memo: dict, reuse: dict) -> Any:
    cls = type(obj)
    if cls in _PLAIN_TYPES:  # the common case first: most of a state dict's leaves
        return obj
    if id(obj) in memo:  # pickle writes an object met twice once: so must the copy be one object
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = _copy_tensor(obj, memo, reuse)
    elif cls is dict:
        out = {k: _copy(v, memo, reuse) for k, v in obj.items()}
    elif isinstance(obj, dict):
        out = copy.copy(obj)  # same type, same instance attributes (an OrderedDict's _metadata)
        for k, v in obj.items():
            out[k] = _copy(v, memo, reuse)
    elif cls is list or cls is tuple:
        out = cls(_copy(v, memo, reuse) for v in obj)
    elif isinstance(obj, _PLAIN):
        return obj
    else:
        out = copy.deepcopy(obj)
    memo[id(obj)] = out
    return out


def _copy_tensor(obj: torch.Tensor, memo: dict, reuse: dict) -> torch.Tensor:
    t = obj.detach()
    if t.layout != torch.strided or t.is_quantized:
        return t.to("cpu", copy=True)
    storage = t.untyped_storage()
    key = ("storage", storage._cdata)  # the identity torch.save itself uses to write a storage once
    if key not in memo:
        buffer = reuse.pop(storage._cdata, None)
        if buffer is None or buffer.nbytes() != storage.nbytes():
            buffer = torch.UntypedStorage(storage.nbytes())
        memo[key] = buffer.copy_(storage)
    return torch.empty(0, dtype=t.dtype).set_(memo[key], t.storage_offset(), t.size(), t.stride())


class HostBuffers:
    """Takes ``host_copy`` snapshots into the host storages of the previous one.

    Only one snapshot at a time may be in use: ``take`` overwrites the previous one's tensors.
    A training run's storages keep their identity and size from save to save (parameters and
    optimizer state are updated in place), so after the first save no host memory is allocated.
    """

    def __init__(self) -> None:
        self._storages: dict[int, torch.UntypedStorage] = {}

    def take(self, state: Any) -> Any:
        """``host_copy(state)``, reusing the previous snapshot's storages (which it overwrites)."""
        memo: dict = {}
        out = host_copy(state, memo, self._storages)
        self._storages = {key[1]: s for key, s in memo.items() if type(key) is tuple}
        return out

    def clear(self) -> None:
        """Drop the storages (the host memory of one copy of the state)."""
        self._storages = {}
