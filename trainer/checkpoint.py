"""Run directories and checkpoints: race-free version folders, atomic writes, weights_only loads, RNG state."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.errors import ConfigError

LAST = "last.pt"


def create_run_dir(log_dir: str | os.PathLike, name: str) -> Path:
    """``<log_dir>/<name>/version_<N>/`` with N one past the highest; ``mkdir`` makes it race-free."""
    root = Path(log_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
        path = root / f"version_{max(taken, default=-1) + 1}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another process took that number first: look again
            continue


def atomic_write(path: Path, write) -> None:
    """Write through ``write(file)`` to a temp file, fsync, then ``os.replace``: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))


def load(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The last checkpoint of a run directory, read with ``weights_only=True``."""
    path = Path(run_dir) / "checkpoints" / LAST
    if not Path(run_dir).is_dir():
        raise ConfigError("--resume", f"no run directory {str(run_dir)!r}", suggestion="pass runs/<name>/version_<N>")
    if not path.is_file():
        raise ConfigError("--resume", f"{run_dir} has no checkpoints/{LAST}", suggestion="that run saved no checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError("--resume", f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}",
                          suggestion="only plain checkpoints are loaded (weights_only=True)") from None


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and primitives (loadable with weights_only=True)."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_py, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v
