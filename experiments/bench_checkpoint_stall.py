"""How long a background checkpoint write holds up the training thread, for a large state.

The training thread runs small SGD steps while another thread writes a checkpoint of SIZE MB
the way ``Checkpoints`` does it (``torch.save`` streamed into the writer process, which hashes and
writes it), and, for comparison, in this process: streamed into the temporary file, hashed on the
way (``atomic_write`` of ``save_hashed``, as a synchronous save does), and serialized into memory
first (``torch.save`` into a ``BytesIO``, then hashed and written). Each step is timed; the figures
are the write's time, the longest step during the write, and the training speed during the write
(the steps done, against what the median step without a write would have done in that time).
The ways alternate, ROUNDS times each; medians over rounds.

Copying a tensor's bytes into a ``BytesIO`` holds the GIL for the whole copy, so the training
thread cannot run a step until it ends; a file write and a hash let go of the GIL.

    python experiments/bench_checkpoint_stall.py
    python experiments/bench_checkpoint_stall.py --size-mb 800 --rounds 5
"""
from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

from trainer import checkpoint, disk


class WriterProcess:
    """Writes through ``Checkpoints``' writer process, into ``path``'s folder."""

    def __init__(self, folder: Path):
        self.process, self.step = checkpoint.WriterProcess(folder, keep=1), 0

    def __call__(self, state: dict, path: Path) -> None:
        self.step += 1
        error = self.process.write(state, self.step, False)
        assert error is None, error


def streamed(state: dict, path: Path) -> str:
    return disk.atomic_write(path, lambda f: checkpoint.save_hashed(state, f))


def in_memory(state: dict, path: Path) -> str:
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    disk.atomic_write(path, lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()


def steps_during(write, state: dict, path: Path) -> tuple[list[float], float]:
    """Step times of a small MLP while ``write(state, path)`` runs in another thread, and the write's time."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    took = []
    thread = threading.Thread(target=lambda: took.append(timed(write, state, path)))
    times = []
    thread.start()
    while thread.is_alive():
        start = time.perf_counter()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    thread.join()
    return times, took[0]


def timed(write, state: dict, path: Path) -> float:
    start = time.perf_counter()
    write(state, path)
    return time.perf_counter() - start


def alone() -> float:
    """The median step with nothing else running (a write that only sleeps)."""
    times, _ = steps_during(lambda state, path: time.sleep(0.3), {}, Path())
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.size_mb <= 0 or args.rounds < 1:
        print("error: --size-mb must be > 0 and --rounds >= 1", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)
    state = {"model": {"weight": torch.randn(int(args.size_mb * 2**20 / 4))}, "step": 1}
    with tempfile.TemporaryDirectory() as tmp:
        ways = {"streamed to the writer process": WriterProcess(Path(tmp) / "process"),
                "streamed into the file, in-process": streamed, "built in memory first, in-process": in_memory}
        results = {name: [] for name in ways}
        for _ in range(args.rounds):
            base = alone()
            for name, write in ways.items():
                times, took = steps_during(write, state, Path(tmp) / "step.pt")
                results[name].append((took, max(times), len(times) * base / took))
        ways["streamed to the writer process"].process.close()
    print(f"a {args.size_mb:g} MB state written while a tiny MLP trains ({args.rounds} rounds, medians):")
    print(f"{'':34} {'write':>9} {'longest step':>13} {'training speed':>15}")
    for name, rows in results.items():
        took, longest, speed = (statistics.median(column) for column in zip(*rows))
        print(f"{name:34} {took * 1e3:7.0f}ms {longest * 1e3:11.1f}ms {speed:14.2f}x")


if __name__ == "__main__":
    main()
