"""Run directories and checkpoints: race-free version folders, a lock, atomic verified writes off the training
process (``disk``), weights_only loads, RNG state."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from trainer import disk
from trainer.disk import BEST, LAST  # noqa: F401  (BEST: also this module's public name)
from trainer.errors import ConfigError
from trainer.snapshot import HostBuffers, host_copy  # noqa: F401  (host_copy: also this module's public name)

WRITER_SCRIPT = Path(disk.__file__)  # what the writer process runs; tests put a slowed or failing writer here
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


class _Frames:
    """What ``torch.save`` writes, framed for the writer process (see ``disk``)."""

    def __init__(self, pipe: BinaryIO):
        self.pipe = pipe

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n:  # a frame of length 0 would end the checkpoint
            self.pipe.write(disk.FRAME.pack(n))
            self.pipe.write(data)
        return n

    def flush(self) -> None:  # the pipe is flushed once, when the checkpoint ends
        pass


class WriterProcess:
    """``disk.py`` run as a process of its own, which writes one folder's checkpoints as they are streamed to it.

    It runs in a session of its own, so that a Ctrl-C meant for the run does not cut a write short
    (the run waits for the write, then ends the writer), and it is killed when the thread that
    started it dies, even by kill -9 (``disk.die_with``).
    """

    def __init__(self, folder: Path, keep: int):
        command = [sys.executable, "-I", "-S", str(WRITER_SCRIPT), str(os.getpid()), str(folder), str(keep)]
        try:
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=disk.CHUNK,
                                         start_new_session=True)
        except OSError as e:
            raise CheckpointError(f"could not start the checkpoint writer process ({type(e).__name__}: {e}); "
                                  "set train.async_checkpoint: false to write checkpoints in the training process") \
                from None

    def write(self, state: Any, step: int, best: bool) -> str | None:
        """``torch.save(state)`` into the writer; None once the checkpoint is in place, else what failed (a line)."""
        pipe = self.proc.stdin
        try:
            pipe.write(json.dumps({"step": step, "best": best}).encode() + b"\n")
            try:
                torch.save(state, _Frames(pipe))
            except Exception:
                pipe.write(disk.FRAME.pack(disk.ABANDONED))
                pipe.flush()
                self.proc.stdout.readline()
                raise
            pipe.write(disk.FRAME.pack(disk.END))
            pipe.flush()
            reply = self.proc.stdout.readline().decode()
        except BrokenPipeError:
            reply = ""
        if not reply:
            return f"the checkpoint writer process ended (exit code {self.proc.wait()}); stopped, the checkpoints " \
                   "it wrote before are kept"
        return None if reply == "ok\n" else reply.removeprefix("error ").rstrip("\n")

    def close(self) -> None:
        """End the writer (an empty line: a forked DataLoader worker may hold the pipe open) and wait for it."""
        with contextlib.suppress(BrokenPipeError):  # it has ended already
            self.proc.stdin.write(b"\n")
        with contextlib.suppress(BrokenPipeError):  # the same (closes the pipe all the same)
            self.proc.stdin.close()
        self.proc.wait()
        self.proc.stdout.close()


class Checkpoints:
    """A run's ``checkpoints/`` folder, written so that no crash can leave it unusable (see ``disk.Folder``).

    ``load`` verifies checksums and ``weights_only`` loading, newest first, and returns the newest
    good checkpoint with what was wrong with any newer one.

    With ``background`` (the default), ``save`` costs the caller only a copy of the state in
    host memory (into the previous copy's buffers) and a hand-off to a thread, which streams
    ``torch.save`` of the copy into the writer process (``WriterProcess``); the writer hashes,
    writes, links and prunes. At most one write is in flight: a new ``save`` first waits for
    the previous one. A failed write is raised as ``CheckpointError`` by the next ``check``,
    ``save`` or ``wait``.

    Args:
        run_dir: the run directory; checkpoints go to its ``checkpoints/`` folder.
        keep: how many ``step_<N>.pt`` files to keep.
        background: write in the writer process (False: in ``save`` itself).
        lock: hold the run directory's lock (``lock_run_dir``) until ``close``, and remove the
            temporary files a killed process left behind.
    """

    def __init__(self, run_dir: Path, keep: int = 3, *, background: bool = True, lock: bool = False):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.background = background
        self._folder = disk.Folder(self.dir, keep)  # synchronous saves
        # both for the whole run: starting a thread per save cost the step up to 2 ms on a busy machine
        self._thread: ThreadPoolExecutor | None = None
        self._process: WriterProcess | None = None
        self._pending: Future | None = None
        self._buffers = HostBuffers()
        self._error: CheckpointError | None = None
        self._lock = None
        self.leftovers: list[str] = []  # what a killed process left, removed when the lock was taken
        if lock:
            if not self.dir.parent.is_dir():
                raise ConfigError("--resume", f"no run directory {str(self.dir.parent)!r}",
                                  suggestion="pass runs/<name>/version_<N>")
            self._lock = lock_run_dir(self.dir.parent)
            self.leftovers = self.remove_temporary_files()  # no other process writes here while the lock is held

    def manifest(self) -> dict[str, Any]:
        return disk.read_manifest(self.dir)

    @property
    def writing(self) -> bool:
        """A background write is in flight."""
        return self._pending is not None and not self._pending.done()

    def save(self, state: dict[str, Any], step: int, best: bool = False) -> None:
        """Checkpoint ``state`` as step ``step`` (and as ``best.pt``): in the background, or now.

        Raises:
            CheckpointError: this write failed (synchronous), or the previous one did, or the writer process
                could not start.
        """
        self.wait()
        if not self.background:
            self._failed(self._folder.write(step, best, lambda f: save_hashed(state, f)))
            self.check()
            return
        snapshot = self._buffers.take(state)  # free to overwrite: the write that used them is done
        if self._process is None:
            self._process = WriterProcess(self.dir, self.keep)  # started by this thread, so it dies with it
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._pending = self._thread.submit(self._send, snapshot, step, best)

    def _send(self, snapshot: dict[str, Any], step: int, best: bool) -> None:
        try:
            self._failed(self._process.write(snapshot, step, best))
        except Exception as e:  # torch.save could not serialize the state
            self._failed(f"could not write checkpoint {self.dir / f'step_{step:08d}.pt'} ({type(e).__name__}: "
                         f"{e}); stopped, the checkpoints written before are kept")

    def _failed(self, error: str | None) -> None:
        if error is not None:
            self._error = CheckpointError(error)

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
        """Wait for the write in flight, end the thread and the writer process, release the lock; raises nothing
        (``wait`` reports errors)."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._process.close()
            self._thread = self._process = self._pending = None
        self._buffers.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def remove_temporary_files(self) -> list[str]:
        """Delete what a killed writer left: ``.<name>.tmp<pid>`` files, never read by ``load``; their names."""
        removed = []
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if re.fullmatch(r"\..+\.tmp\d+", p.name):
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
        return sorted(removed)

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
        candidates = disk.step_files(self.dir) + [self.dir / LAST]
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
