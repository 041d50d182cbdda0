"""Run directories and checkpoints: race-free version folders, atomic verified writes, weights_only loads, RNG state."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.errors import ConfigError

LAST = "last.pt"
BEST = "best.pt"


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


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file, fsync, then ``os.replace``: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_link(source: Path, path: Path) -> None:
    """Make ``path`` the same file as ``source`` (a hard link: no second copy), replacing it atomically."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a filesystem without hard links: copy instead
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


class Checkpoints:
    """A run's ``checkpoints/`` folder, written so that no crash can leave it unusable.

    Each save writes a new ``step_<N>.pt`` atomically and records its sha256 in
    ``manifest.json`` (also atomic); ``last.pt`` (and ``best.pt`` when the monitored metric
    improved) then become hard links to it. The newest ``keep`` step files are kept.
    ``load`` verifies checksums and ``weights_only`` loading, newest first, and returns the
    newest good checkpoint with what was wrong with any newer one.
    """

    def __init__(self, run_dir: Path, keep: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        try:
            data = json.loads(self.manifest_path.read_text())
            return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {"files": {}}
        except (OSError, ValueError):
            return {"files": {}}

    def save(self, state: dict[str, Any], step: int, best: bool = False) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        path = self.dir / f"step_{step:08d}.pt"
        atomic_write(path, data)
        manifest = self.manifest()
        manifest["files"][path.name] = {"step": step, "sha256": digest}
        manifest["last"] = {"file": path.name, "step": step, "sha256": digest}
        if best:
            manifest["best"] = {"file": path.name, "step": step, "sha256": digest}
        steps = sorted(self.step_files(), key=_step_of, reverse=True)
        for old in steps[self.keep:]:
            old.unlink(missing_ok=True)
            manifest["files"].pop(old.name, None)
        atomic_write(self.manifest_path, json.dumps(manifest, indent=1).encode())
        atomic_link(path, self.dir / LAST)
        if best:
            atomic_link(path, self.dir / BEST)
        return path

    def step_files(self) -> list[Path]:
        return [p for p in self.dir.glob("step_*.pt") if _step_of(p) >= 0]

    def load(self) -> tuple[dict[str, Any], Path, list[str]]:
        """The newest checkpoint that verifies, its path, and one line per newer file that did not.

        Raises:
            ConfigError: no checkpoint in the folder verifies.
        """
        if not self.dir.parent.is_dir():
            raise ConfigError("--resume", f"no run directory {str(self.dir.parent)!r}",
                              suggestion="pass runs/<name>/version_<N>")
        manifest = self.manifest()
        known = {name: entry.get("sha256") for name, entry in manifest["files"].items() if isinstance(entry, dict)}
        last = manifest.get("last") if isinstance(manifest.get("last"), dict) else {}
        candidates = sorted(self.step_files(), key=_step_of, reverse=True) + [self.dir / LAST]
        problems = []
        for path in candidates:
            if not path.is_file():
                continue
            expected = known.get(path.name) if path.name != LAST else last.get("sha256")
            state = verify(path, expected)
            if isinstance(state, dict):
                return state, path, problems
            problems.append(f"{path.relative_to(self.dir.parent)} {state}")
        if not problems:
            raise ConfigError("--resume", f"{self.dir.parent} has no checkpoint", suggestion="that run saved none")
        raise ConfigError("--resume", f"no usable checkpoint in {self.dir}: {'; '.join(problems)}",
                          suggestion="start a new run")


def verify(path: Path, sha256: str | None) -> dict[str, Any] | str:
    """The checkpoint's state if it is whole and plain, else why not (a phrase)."""
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        return "is corrupt: its sha256 differs from manifest.json"
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        return f"holds Python objects that torch.load(weights_only=True) refuses ({str(e).splitlines()[0][:120]})"
    except Exception as e:
        return f"is truncated or not a checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
        return "is not a trainer checkpoint (no model, optimizer and step)"
    return state


def _step_of(path: Path) -> int:
    m = re.fullmatch(r"step_(\d+)\.pt", path.name)
    return int(m.group(1)) if m else -1


def reseed(device: torch.device | str, seed: int) -> None:
    """Seed just the generator ``device`` draws from (``torch.manual_seed`` seeds every backend, ~100x slower)."""
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


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
