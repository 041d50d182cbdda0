"""Checkpoint writes slowed down or failing as on a full disk, in the training process and in its writer process.

``wrap(disk.atomic_write)`` is what a test puts in place of ``disk.atomic_write`` in the training
process (synchronous saves); run as a script, this file is the writer process with the same
wrapper (``checkpoint.WRITER_SCRIPT``). Environment variables, which the writer process
inherits, say what happens to each ``step_<N>.pt`` write:

    FAULTY_WRITER_LOG         a file the step file's name and the writing pid are appended to as its write begins
    FAULTY_WRITER_SECONDS     how long the write sleeps first
    FAULTY_WRITER_FULL_AFTER  N: the writes after the first N fail as on a full disk
"""
from __future__ import annotations

import errno
import os
import time


def wrap(write):
    calls = []

    def faulty_atomic_write(path, fill, owner=None):
        if path.name.startswith("step_"):
            calls.append(path.name)
            if "FAULTY_WRITER_LOG" in os.environ:
                with open(os.environ["FAULTY_WRITER_LOG"], "a") as f:
                    f.write(f"{path.name} {os.getpid()}\n")
            time.sleep(float(os.environ.get("FAULTY_WRITER_SECONDS", "0")))
            if len(calls) > int(os.environ.get("FAULTY_WRITER_FULL_AFTER", len(calls))):
                raise OSError(errno.ENOSPC, "No space left on device")
        return write(path, fill, owner)

    return faulty_atomic_write


if __name__ == "__main__":  # the writer process: the standard library and disk.py, loaded from its file
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("disk", Path(__file__).resolve().parents[1] / "trainer" / "disk.py")
    disk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(disk)
    disk.atomic_write = wrap(disk.atomic_write)
    disk.main(sys.argv[1:])
