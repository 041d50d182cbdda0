"""Shared helpers: configs in a temporary run folder, and running the real `trainer` command."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import Trainer

# Small tensors on a shared 2-core machine: a second intra-op thread costs more in
# synchronisation than it saves (a float64 conv gradcheck took 8-30 s with two threads, ~1 s with one).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture
def quick(tmp_path):
    """``quick(*overrides)``: the quickstart config, logging under tmp_path, no progress bar."""
    from trainer import load_config

    def make(*overrides: str, source=QUICKSTART):
        return load_config(source, [f"log.dir={tmp_path / 'runs'}", "log.progress=false", *overrides])
    return make


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``python -m trainer ARGS`` in a real subprocess."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


class StopAt(Trainer):
    """Delivers a real ``sig`` (SIGINT: as Ctrl-C would) to this process after step ``at``."""

    at = 0
    sig = signal.SIGINT

    def train_step(self, batches):
        loss = super().train_step(batches)
        if self.step + 1 == self.at:
            signal.raise_signal(self.sig)
        return loss
