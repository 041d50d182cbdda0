"""Imported by a run under test (``imports: [slow_writer]``): every step file's write is noted, then slowed.

Each write of a ``step_<N>.pt`` appends its name to the file ``$SLOW_WRITER_LOG`` (so a test knows
a write is in flight) and sleeps ``$SLOW_WRITER_SECONDS`` before writing it.
"""
from __future__ import annotations

import os
import time

from trainer import checkpoint

_atomic_write = checkpoint.atomic_write


def slow_atomic_write(path, data: bytes) -> None:
    if path.name.startswith("step_"):
        with open(os.environ["SLOW_WRITER_LOG"], "a") as f:
            f.write(f"{path.name}\n")
        time.sleep(float(os.environ.get("SLOW_WRITER_SECONDS", "0.5")))
    _atomic_write(path, data)


checkpoint.atomic_write = slow_atomic_write
