"""Run directories and checkpoints: race-free version folders, a lock, atomic verified writes off the training
thread, weights_only loads, RNG state."""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch

from trainer.errors import ConfigError
from trainer.snapshot import HostBuffers, host_copy  # noqa: F401  (host_copy: also this module's public name)

LAST = "last.pt"
BEST = "best.pt"
T = TypeVar("T")
REQUIRED = ("model", "optimizer", "scaler", "step", "epoch", "batch_in_epoch", "rng")  # what a resume reads


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


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission); the run stops, older checkpoints stay usable."""


def lock_run_dir(run_dir: Path):
    """Hold ``<run_dir>/.lock`` (``flock``) for as long as the returned file stays open.

    The kernel drops the lock when the process ends, however it ends, so kill -9 leaves no stale lock.

    Raises:
        ConfigError: another process holds it (the message names its pid).
    """
    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise ConfigError("--resume", f"{run_dir} is in use by process {holder or '(unknown pid)'}, which is "
                          "training in it", suggestion="wait for that process to end, or stop it") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def atomic_write(path: Path, fill: Callable[[BinaryIO], T]) -> T:
    """``fill(file)`` into a temp file, fsync, then ``os.replace``: readers see the old file or the new one, never
    half. Returns what ``fill`` returns."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            result = fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return result
    except BaseException:  # only then is there a temp file to remove (an unlink per write costs ~1 ms on a busy disk)
        tmp.unlink(missing_ok=True)
        raise


class _Sha256Writer:
    """Passes writes on to ``file`` and hashes them on the way."""

    def __init__(self, file: BinaryIO):
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def save_hashed(state: Any, file: BinaryIO) -> str:
    """``torch.save(state, file)``; returns the sha256 of the bytes written.

    Streamed into the file, not built in memory first: writing a tensor's bytes to a file (and
    hashing them) lets go of the GIL, copying them into a ``BytesIO`` does not, so a background
    write of a large state would hold the training thread up for as long as the copy takes.
    """
    out = _Sha256Writer(file)
    torch.save(state, out)
    return out.sha256.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_link(source: Path, path: Path) -> None:
    """Make ``path`` the same file as ``source`` (a hard link: no second copy), replacing it atomically."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        os.link(source, tmp)
    except FileExistsError:  # left by a killed process that had this pid
        tmp.unlink()
        os.link(source, tmp)
    except OSError:  # a filesystem without hard links: copy instead
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


class Checkpoints:
    """A run's ``checkpoints/`` folder, written so that no crash can leave it unusable.

    Each save writes a new ``step_<N>.pt`` atomically and records its sha256 in
    ``manifest.json`` (also atomic); ``last.pt`` (and ``best.pt`` when the monitored metric
    improved) then become hard links to it, and only then are step files beyond the newest
    ``keep`` removed. ``load`` verifies checksums and ``weights_only`` loading, newest first,
    and returns the newest good checkpoint with what was wrong with any newer one.

    With ``background`` (the default), ``save`` costs the caller only a copy of the state in
    host memory (into the previous copy's buffers) and a hand-off to one long-lived writer
    thread, which serializes, hashes, writes and prunes. At most one write is in flight: a new
    ``save`` first waits for the previous one. A failed write is raised as ``CheckpointError``
    by the next ``check``, ``save`` or ``wait``.

    Args:
        run_dir: the run directory; checkpoints go to its ``checkpoints/`` folder.
        keep: how many ``step_<N>.pt`` files to keep.
        background: write in a thread (False: in ``save`` itself).
        lock: hold the run directory's lock (``lock_run_dir``) until ``close``, and remove the
            temporary files a killed process left behind.
    """

    def __init__(self, run_dir: Path, keep: int = 3, *, background: bool = True, lock: bool = False):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.background = background
        # one thread for the whole run: starting a thread per save cost the step up to 2 ms on a busy machine
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._buffers = HostBuffers()
        self._manifest: dict[str, Any] | None = None
        self._error: CheckpointError | None = None
        self._lock = None
        self.leftovers: list[str] = []  # what a killed process left, removed when the lock was taken
        if lock:
            if not self.dir.parent.is_dir():
                raise ConfigError("--resume", f"no run directory {str(self.dir.parent)!r}",
                                  suggestion="pass runs/<name>/version_<N>")
            self._lock = lock_run_dir(self.dir.parent)
            self.leftovers = self.remove_temporary_files()  # no other process writes here while the lock is held

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        try:
            data = json.loads(self.manifest_path.read_text())
            return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {"files": {}}
        except (OSError, ValueError):
            return {"files": {}}

    def save(self, state: dict[str, Any], step: int, best: bool = False) -> None:
        """Checkpoint ``state`` as step ``step`` (and as ``best.pt``): in the background, or now.

        Raises:
            CheckpointError: this write failed (synchronous), or the previous one did.
        """
        self.wait()
        if not self.background:
            self._write(state, step, best)
            self.check()
            return
        snapshot = self._buffers.take(state)  # free to overwrite: the write that used them is done
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._pending = self._writer.submit(self._write, snapshot, step, best)

    def check(self) -> None:
        """Raise a failed write's error, once (cheap: the loop calls it every step)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self) -> None:
        """Wait for the write in flight, then ``check``."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        self.check()

    def close(self) -> None:
        """Wait for the write in flight, end the writer thread and release the lock; raises nothing (``wait``
        reports errors)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = self._pending = None
        self._buffers.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _write(self, state: dict[str, Any], step: int, best: bool) -> None:
        path = self.dir / f"step_{step:08d}.pt"
        # the manifest as this object last wrote it: read (and the folder made) once, not at every write
        manifest, self._manifest = self._manifest, None  # kept again once this write is whole
        first = manifest is None
        if first:
            manifest = self.manifest()
        previous = manifest.get("last")
        try:
            if first:
                self.dir.mkdir(parents=True, exist_ok=True)
            digest = atomic_write(path, lambda f: save_hashed(state, f))
            entry = {"file": path.name, "step": step, "sha256": digest}
            manifest["files"][path.name] = {"step": step, "sha256": digest}
            manifest["last"] = entry
            if best:
                manifest["best"] = entry
            old = sorted(self.step_files(), key=_step_of, reverse=True)[self.keep:]
            for p in old:
                manifest["files"].pop(p.name, None)
            text = json.dumps(manifest, indent=1).encode()
            atomic_write(self.manifest_path, lambda f: f.write(text))
            atomic_link(path, self.dir / LAST)
            if best:
                atomic_link(path, self.dir / BEST)
            for p in old:  # only now: until the new manifest and links are in place, the old files are the fallback
                p.unlink(missing_ok=True)
            fsync_dir(self.dir)  # the renames themselves survive a power cut
            self._manifest = manifest
        except Exception as e:  # disk full, read-only, a file where the folder should be, ...
            kept = f"the checkpoint of step {previous['step']} is kept" if isinstance(previous, dict) \
                else "no earlier checkpoint exists"
            self._error = CheckpointError(f"could not write checkpoint {path} ({type(e).__name__}: {e}); "
                                          f"stopped, {kept}")

    def remove_temporary_files(self) -> list[str]:
        """Delete what a killed writer left: ``.<name>.tmp<pid>`` files, never read by ``load``; their names."""
        removed = []
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if re.fullmatch(r"\..+\.tmp\d+", p.name):
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
        return sorted(removed)

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
    if not isinstance(state, dict):
        return f"is not a trainer checkpoint (it holds a {type(state).__name__}, not a dict)"
    missing = [key for key in REQUIRED if key not in state]
    if missing:  # e.g. a file saved by hand with only the model: it verifies, but cannot resume a run
        return f"lacks the keys {', '.join(missing)} (a trainer checkpoint holds {', '.join(REQUIRED)})"
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
        # the 625 words as one tensor: as a list, pickling them one by one was most of a small checkpoint's cost
        "python": [version, torch.from_numpy(np.array(keys, dtype=np.int64)), gauss],  # 3x faster than torch.tensor
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_py, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys.tolist() if isinstance(keys, torch.Tensor) else keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v
