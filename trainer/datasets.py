"""The dataset registry: regression, classification, tensor_file, digits; each split train/val by a seeded fraction."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from trainer.errors import ConfigError
from trainer.registry import Registry

REGISTRY: Registry = Registry("dataset")
register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


class Batch(list):
    """A whole batch, ``[inputs, targets]``, as a dataset gathered it: ``trainer.data.collate`` passes it as it is."""


class Tensors(TensorDataset):
    """A TensorDataset that hands a DataLoader whole batches.

    DataLoader calls ``__getitems__`` with a batch's indices where a dataset has one; here that
    is one gather per tensor instead of ``batch_size`` calls to ``__getitem__`` and a collate.
    The batches are the same, bit for bit.
    """

    def __getitems__(self, indices: list[int]) -> Batch:
        # the indices as one tensor, made once: indexing with the list itself converts it again for every tensor
        index = torch.as_tensor(indices, dtype=torch.long)
        return Batch(t.index_select(0, index) for t in self.tensors)


def split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int) -> dict[str, Dataset]:
    """``{"train": ..., "val": ...}`` by a seeded permutation; no "val" when the fraction is 0."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("val_fraction", f"must be in [0, 1), got {val_fraction}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = math.floor(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    if len(train) == 0:
        raise ConfigError("val_fraction", "leaves no training samples")
    out: dict[str, Dataset] = {"train": Tensors(x[train], y[train])}
    if n_val:
        out["val"] = Tensors(x[val], y[val])
    return out


@register("regression")
def regression(n_samples: int = 1024, in_features: int = 10, noise: float = 0.1, val_fraction: float = 0.2,
               seed: int = 0) -> dict[str, Dataset]:
    """The seed task: y = x·w + b + noise, with x ~ N(0, 1)^in_features and a fixed random w, b; y has shape (N, 1)."""
    if n_samples < 1 or in_features < 1:
        raise ConfigError("n_samples", "n_samples and in_features must be at least 1")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, in_features, generator=g)
    w = torch.randn(in_features, 1, generator=g)
    b = torch.randn(1, generator=g)
    y = x @ w + b + noise * torch.randn(n_samples, 1, generator=g)
    return split(x, y, val_fraction, seed)


@register("classification")
def classification(kind: Literal["blobs", "spirals"] = "blobs", n_samples: int = 1024, n_features: int = 2,
                   n_classes: int = 3, noise: float = 0.5, val_fraction: float = 0.2,
                   seed: int = 0) -> dict[str, Dataset]:
    """Synthetic classes with integer targets: Gaussian ``blobs`` in ``n_features`` dimensions, or 2-D ``spirals``."""
    if n_classes < 2 or n_samples < n_classes:
        raise ConfigError("n_classes", f"need at least 2 classes and a sample per class, got {n_classes}")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_samples) % n_classes
    if kind == "blobs":
        centers = 3.0 * torch.randn(n_classes, n_features, generator=g)
        x = centers[y] + noise * torch.randn(n_samples, n_features, generator=g)
    else:
        if n_features != 2:
            raise ConfigError("n_features", "spirals are 2-D", suggestion="set n_features: 2")
        r = torch.rand(n_samples, generator=g)
        theta = 3.0 * math.pi * r + 2.0 * math.pi * y / n_classes
        x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1)
        x = x + noise * 0.1 * torch.randn(n_samples, 2, generator=g)
    return split(x, y, val_fraction, seed)


@register("tensor_file")
def tensor_file(path: str, target: str, features: list[str] | None = None,
                target_dtype: Literal["auto", "float", "long"] = "auto", val_fraction: float = 0.2,
                seed: int = 0) -> dict[str, Dataset]:
    """Named columns from a ``.pt`` (dict of tensors), ``.npz`` or ``.csv`` (header row) file.

    Args:
        path: the file, relative to the current directory.
        target: the target column's name.
        features: the feature columns (default: every column but the target); a
            multi-dimensional array in a .pt/.npz file is one "column".
        target_dtype: ``long`` for class indices, ``float`` for regression (then the
            target gets shape (N, 1) if it is 1-D); ``auto`` keeps the file's integer or
            float type.
    """
    columns = _read_columns(Path(path))
    if target not in columns:
        raise ConfigError("target", f"no column {target!r} in {path}", choices=columns, given=target)
    names_ = features if features is not None else [c for c in columns if c != target]
    for i, name in enumerate(names_):
        if name not in columns:
            raise ConfigError(f"features[{i}]", f"no column {name!r} in {path}", choices=columns, given=name)
    if not names_:
        raise ConfigError("features", f"{path} has no feature columns besides the target")
    cols = [columns[n].reshape(len(columns[n]), -1).float() for n in names_]
    x = torch.cat(cols, 1) if len(cols) > 1 or columns[names_[0]].dim() <= 2 else columns[names_[0]].float()
    y = columns[target]
    if target_dtype == "long" or target_dtype == "auto" and not y.is_floating_point():
        y = y.long()
    else:
        y = y.float().reshape(-1, 1) if y.dim() == 1 else y.float()
    if len(y) != len(x):
        raise ConfigError("target", f"{len(y)} targets for {len(x)} samples")
    return split(x, y, val_fraction, seed)


def _read_columns(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError("path", f"no such file {str(path)!r}", suggestion="paths are relative to the current directory")
    try:
        if path.suffix == ".pt":
            data = torch.load(path, weights_only=True)
            if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
                raise ConfigError("path", f"{path} must hold a dict of tensors")
            return dict(data)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
        if path.suffix == ".csv":
            table = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64, encoding="utf-8")
            table = np.atleast_1d(table)
            for name in table.dtype.names:  # genfromtxt reads a text or empty cell as NaN
                bad = np.flatnonzero(np.isnan(table[name]))
                if len(bad):
                    raise ConfigError("path", f"{path}: column {name!r}, data row {bad[0] + 1} is not a number "
                                      f"({len(bad)} such cell{'s' if len(bad) > 1 else ''} in that column)",
                                      suggestion="every cell of a CSV must be a number; encode classes as integers")
            return {name: torch.from_numpy(np.ascontiguousarray(table[name])) for name in table.dtype.names}
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError("path", f"cannot read {path}: {e}") from None
    raise ConfigError("path", f"unsupported file type {path.suffix!r}", choices=[".pt", ".npz", ".csv"],
                      given=path.suffix)


@register("digits")
def digits(flatten: bool = True, val_fraction: float = 0.2, seed: int = 0) -> dict[str, Dataset]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), scaled to [0, 1].

    ``flatten`` gives (N, 64) vectors for an MLP; otherwise (N, 1, 8, 8) images for a CNN.
    Needs scikit-learn (``pip install 'trainer[digits]'``); nothing is downloaded.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("name", "the digits dataset needs scikit-learn",
                          suggestion="pip install scikit-learn (or the trainer[digits] extra)") from None
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    x = x.reshape(len(x), 64) if flatten else x.unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return split(x, y, val_fraction, seed)
