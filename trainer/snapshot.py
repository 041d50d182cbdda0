"""The training state copied to host memory, on the training thread, before a checkpoint is written in the background.

The copy is what an asynchronous save costs the step, so it is kept to the tensor copies themselves:
plain values are shared rather than copied (they are immutable), plain ``dict``/``list``/``tuple``
containers are rebuilt without ``copy`` machinery, and ``HostBuffers`` refills the previous
snapshot's tensors instead of making new ones: at most one write is in flight and the next save
waits for it, so by then nothing reads them any more.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

# immutable: the snapshot may share them with the live state (pickle writes them by value)
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_PLAIN_TYPES = frozenset(_PLAIN)


def host_copy(obj: Any) -> Any:
    """``obj`` with every tensor copied to host memory: nothing in the copy changes when training goes on.

    Tensors that shared a storage (tied weights, views) share one copied storage, an object met
    twice is copied once, and containers keep their types and attributes (a state_dict's
    ``_metadata``), so ``torch.save`` writes the same bytes for the copy as for the original.
    """
    storages: dict[int, torch.UntypedStorage] = {}

    def tensor(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.layout != torch.strided or t.is_quantized:
            return t.to("cpu", copy=True)
        storage = t.untyped_storage()
        key = storage._cdata  # the identity torch.save itself uses to write a storage once
        if key not in storages:
            storages[key] = torch.UntypedStorage(storage.nbytes()).copy_(storage)
        return torch.empty(0, dtype=t.dtype).set_(storages[key], t.storage_offset(), t.shape, t.stride())

    return _copy(obj, {}, tensor)


def _copy(obj: Any, memo: dict[int, Any], tensor: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    cls = type(obj)
    if cls in _PLAIN_TYPES:  # the common case first: most of a state dict's leaves
        return obj
    if id(obj) in memo:  # pickle writes an object met twice once: so must the copy be one object
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = tensor(obj)
    elif cls is dict:
        out = {k: _copy(v, memo, tensor) for k, v in obj.items()}
    elif isinstance(obj, dict):
        out = copy.copy(obj)  # same type, same instance attributes (an OrderedDict's _metadata)
        for k, v in obj.items():
            out[k] = _copy(v, memo, tensor)
    elif cls is list or cls is tuple:
        out = cls(_copy(v, memo, tensor) for v in obj)
    elif isinstance(obj, _PLAIN):
        return obj
    else:
        out = copy.deepcopy(obj)
    memo[id(obj)] = out
    return out


class HostBuffers:
    """Takes ``host_copy`` snapshots into the tensors (and host memory) of the previous one.

    Only one snapshot at a time may be in use: ``take`` overwrites the previous one's tensors.
    A run's tensors keep their storage, shape and dtype from save to save (parameters and
    optimizer state are updated in place), so after the first save a snapshot allocates
    nothing: each tensor's copy is the previous copy, refilled by one batched copy.
    """

    def __init__(self) -> None:
        # the previous snapshot's tensors, by (source storage, its size, dtype, offset, shape, stride)
        self._tensors: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def take(self, state: Any) -> Any:
        """``host_copy(state)``, in the previous snapshot's tensors where they fit (which it overwrites)."""
        previous, now = self._tensors, {}
        buffers: dict[int, torch.UntypedStorage] = {}  # by source storage: this snapshot's copy of it
        targets: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []

        def tensor(t: torch.Tensor) -> torch.Tensor:
            if t.layout != torch.strided or t.is_quantized:
                return t.to("cpu", copy=True)
            storage = t.untyped_storage()
            sid = storage._cdata
            key = (sid, storage.nbytes(), t.dtype, t.storage_offset(), t.shape, t.stride())
            if key in now:  # the same view met twice
                return now[key]
            out, buffer = previous.pop(key, None), buffers.get(sid)
            if out is None or buffer is not None and out.untyped_storage().data_ptr() != buffer.data_ptr():
                buffer = torch.UntypedStorage(storage.nbytes()) if buffer is None else buffer
                out = torch.empty(0, dtype=t.dtype).set_(buffer, t.storage_offset(), t.shape, t.stride())
            now[key] = out
            if sid not in buffers:  # the storage's first tensor: copy the storage
                buffers[sid] = out.untyped_storage()
                if t.storage_offset() == 0 and t.is_contiguous() and t.numel() * t.element_size() == storage.nbytes():
                    targets.append(out)  # the tensor is the whole storage: copied with the others below
                    sources.append(t)
                else:  # a view of part of it (a transposed tie, a slice): the bytes around it are written too
                    buffers[sid].copy_(storage)
            return out

        out = _copy(state, {}, tensor)
        if targets:
            torch._foreach_copy_(targets, sources)  # one call: a copy_ per tensor was most of a snapshot's cost
        self._tensors = now
        return out

    def clear(self) -> None:
        """Drop the copies (the host memory of one copy of the state)."""
        self._tensors = {}
