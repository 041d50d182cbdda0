"""A run's ``checkpoints/`` folder on disk, with the standard library only.

``Folder.write`` puts one checkpoint in place so that no crash can leave the folder unusable:
the new ``step_<N>.pt`` is written atomically and its sha256 recorded in ``manifest.json`` (also
atomic); ``last.pt`` (and ``best.pt``) then become hard links to it; only then are the step files
beyond the newest ``keep`` removed; an fsync of the folder makes the renames survive a power cut.

A synchronous save calls it inside the training process. For asynchronous saves this file runs
on its own as the checkpoint writer process (``python -I -S disk.py <pid> <folder> <keep>``: no
torch, no ``trainer`` package): the training process streams each ``torch.save`` into the
writer's stdin, and the hashing, fsyncs, manifest, links and pruning happen there, off the
training process's GIL. PyTorch's distributed checkpointing offers a process-based async writer
for the same reason.

The pipe carries, per checkpoint, one JSON line (``{"step": N, "best": bool}``) and then frames:
an 8-byte signed length and that many bytes; a length of 0 ends the checkpoint, -1 abandons it
(the sender's ``torch.save`` failed). The writer answers one line: ``ok``, or ``error <message>``.
An empty line, or the end of its stdin, ends the writer.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

LAST = "last.pt"
BEST = "best.pt"
MANIFEST = "manifest.json"
FRAME = struct.Struct("<q")  # a frame's length
END, ABANDONED = 0, -1
CHUNK = 1 << 20  # the writer reads a long frame in pieces of at most this size
T = TypeVar("T")


def temporary(path: Path, owner: int | None = None) -> Path:
    """Where ``path`` is written before it is renamed into place: ``.<name>.tmp<pid>``, with the pid of the
    training process (``owner``) whichever process writes it, so that a resume knows it for a leftover."""
    return path.with_name(f".{path.name}.tmp{owner or os.getpid()}")


def atomic_write(path: Path, fill: Callable[[BinaryIO], T], owner: int | None = None) -> T:
    """``fill(file)`` into a temp file, fsync, then ``os.replace``: readers see the old file or the new one, never
    half. Returns what ``fill`` returns."""
    tmp = temporary(path, owner)
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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_link(source: Path, path: Path, owner: int | None = None) -> None:
    """Make ``path`` the same file as ``source`` (a hard link: no second copy), replacing it atomically."""
    tmp = temporary(path, owner)
    try:
        os.link(source, tmp)
    except FileExistsError:  # left by a killed process that had this pid
        tmp.unlink()
        os.link(source, tmp)
    except OSError:  # a filesystem without hard links: copy instead
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def step_of(path: Path) -> int:
    m = re.fullmatch(r"step_(\d+)\.pt", path.name)
    return int(m.group(1)) if m else -1


def step_files(folder: Path) -> list[Path]:
    """The ``step_<N>.pt`` files in ``folder``, newest first."""
    return sorted((p for p in folder.glob("step_*.pt") if step_of(p) >= 0), key=step_of, reverse=True)


def read_manifest(folder: Path) -> dict[str, Any]:
    """``manifest.json``'s contents, or an empty manifest when it is missing or unreadable."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {"files": {}}
    except (OSError, ValueError):
        return {"files": {}}


class Folder:
    """The checkpoint folder as one writer sees it: the manifest is read once, then kept as last written.

    Args:
        path: the ``checkpoints/`` folder (made at the first write).
        keep: how many ``step_<N>.pt`` files to keep.
        owner: the training process's pid, which names the temporary files (default: this process).
    """

    def __init__(self, path: Path, keep: int, owner: int | None = None):
        self.dir, self.keep, self.owner = Path(path), keep, owner or os.getpid()
        self._manifest: dict[str, Any] | None = None

    def write(self, step: int, best: bool, fill: Callable[[BinaryIO], str]) -> str | None:
        """Write step ``step``'s checkpoint with ``fill`` (which writes the bytes and returns their sha256).

        Returns:
            None once the checkpoint is in place, else one line saying what failed (the folder is as it was,
            give or take the removal of old step files).
        """
        path = self.dir / f"step_{step:08d}.pt"
        manifest, self._manifest = self._manifest, None  # kept again once this write is whole
        first = manifest is None
        if first:
            manifest = read_manifest(self.dir)
        previous = manifest.get("last")
        try:
            if first:
                self.dir.mkdir(parents=True, exist_ok=True)
            digest = atomic_write(path, fill, self.owner)
            entry = {"file": path.name, "step": step, "sha256": digest}
            manifest["files"][path.name] = {"step": step, "sha256": digest}
            manifest["last"] = entry
            if best:
                manifest["best"] = entry
            old = step_files(self.dir)[self.keep:]
            for p in old:
                manifest["files"].pop(p.name, None)
            text = json.dumps(manifest, indent=1).encode()
            atomic_write(self.dir / MANIFEST, lambda f: f.write(text), self.owner)
            atomic_link(path, self.dir / LAST, self.owner)
            if best:
                atomic_link(path, self.dir / BEST, self.owner)
            for p in old:  # only now: until the new manifest and links are in place, the old files are the fallback
                p.unlink(missing_ok=True)
            fsync_dir(self.dir)  # the renames themselves survive a power cut
            self._manifest = manifest
            return None
        except Exception as e:  # disk full, read-only, a file where the folder should be, ...
            kept = f"the checkpoint of step {previous['step']} is kept" if isinstance(previous, dict) \
                else "no earlier checkpoint exists"
            return f"could not write checkpoint {path} ({type(e).__name__}: {e}); stopped, {kept}"


# --- the writer process ----------------------------------------------------------------------------------


class Abandoned(Exception):
    """The sender gave up on this checkpoint (its ``torch.save`` failed)."""


class Frames:
    """One checkpoint's bytes as they arrive on ``stream``, framed by the sender."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.done = stream, False

    def __iter__(self) -> Iterator[bytes]:
        while not self.done:
            (length,) = FRAME.unpack(self._read(FRAME.size))
            if length <= 0:
                self.done = True
                if length == ABANDONED:
                    raise Abandoned("the training process could not serialize the state")
            while length > 0:
                piece = self._read(min(length, CHUNK))
                length -= len(piece)
                yield piece

    def copy_to(self, file: BinaryIO) -> str:
        """Write the checkpoint's bytes to ``file``; their sha256."""
        sha256 = hashlib.sha256()
        for piece in self:
            sha256.update(piece)
            file.write(piece)
        return sha256.hexdigest()

    def drain(self) -> None:
        """Read what is left of the checkpoint (after a failed write), so that the next request starts in step."""
        try:
            for _ in self:
                pass
        except Abandoned:
            pass

    def _read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) < n:  # the training process is gone
            raise SystemExit(0)
        return data


def die_with(parent: int) -> None:
    """Be killed when the training process dies, even by kill -9 (Linux's ``PR_SET_PDEATHSIG``), so that no write
    goes on behind a resume; elsewhere the writer ends when its stdin does, and a write cut short leaves nothing."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl
        raise SystemExit(0)


def serve(folder: Folder, requests: BinaryIO, replies: BinaryIO) -> None:
    """The writer process's loop: one checkpoint per request, one line of answer each."""
    while line := requests.readline().strip():
        request = json.loads(line)
        frames = Frames(requests)
        error = folder.write(request["step"], request["best"], frames.copy_to)
        frames.drain()
        replies.write(b"ok\n" if error is None else f"error {error}".replace("\n", " ").encode() + b"\n")
        replies.flush()


def main(argv: list[str]) -> None:
    """``disk.py <pid of the training process> <checkpoint folder> <keep>``."""
    owner, folder, keep = int(argv[0]), Path(argv[1]), int(argv[2])
    die_with(owner)
    serve(Folder(folder, keep, owner), sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main(sys.argv[1:])
