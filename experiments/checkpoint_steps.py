"""Where a checkpoint at an epoch end costs the training loop its time, step by step.

The trainer trains the tiny MLP of ``bench_overhead.py`` (its user's plain ``TensorDataset``,
50-batch epochs, so a checkpoint every 50 steps) with the checkpoints written in the background
and, for comparison, in the step (``train.async_checkpoint: false``). It notes the time at the
edges of ``save``, ``train_step`` and ``on_step`` and prints, as medians over the epoch ends
after the first few, how long each stretch after an epoch's last step takes, next to the same
stretch of an ordinary step:

- ``save``: the training thread's part of a save (the finiteness checks, the state dict, the
  snapshot; in the step, the whole write);
- the next epoch's first batch (a new loader iterator, the sampler's new order), then its first
  two steps: a background write runs beside these, and what it takes from the loop shows here.

    python experiments/checkpoint_steps.py
    python experiments/checkpoint_steps.py --steps 5000
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_overhead  # noqa: E402  (its models, data and config)

from trainer import Trainer  # noqa: E402

SKIP = 4  # epoch ends left out at the start (first allocations, the writer process starting)
STRETCHES = ["save", "first batch", "first step", "second batch", "second step"]


class Marked(Trainer):
    """The Trainer, noting (what, when) at the edges of save, train_step and on_step."""

    def save(self, best: bool = False) -> None:
        self.marks.append(("save", time.perf_counter()))
        super().save(best)
        self.marks.append(("saved", time.perf_counter()))

    def train_step(self, batches):
        self.marks.append(("step", time.perf_counter()))
        loss = super().train_step(batches)
        self.marks.append(("stepped", time.perf_counter()))
        return loss

    def on_step(self) -> None:
        super().on_step()
        self.marks.append(("on_step", time.perf_counter()))


def stretches(background: bool, steps: int) -> tuple[dict[str, float], float, float]:
    """Median seconds of each stretch after an epoch end, and of an ordinary batch and step."""
    with tempfile.TemporaryDirectory() as logdir:
        cfg = bench_overhead.config("tiny", steps, logdir, ["log.progress=false",
                                                            f"train.async_checkpoint={background}"], epoch=50)
        trainer = Marked(cfg)
        trainer.marks = []
        trainer.fit()
    marks = trainer.marks
    ends = [i for i, (what, _) in enumerate(marks) if what == "save" and i + 6 < len(marks)][SKIP:]
    found: dict[str, list[float]] = {name: [] for name in STRETCHES}
    for i in ends:  # save, saved, step, stepped, on_step, step, stepped
        times = [t for _, t in marks[i:i + 7]]
        for name, (a, b) in zip(STRETCHES, [(0, 1), (1, 2), (2, 3), (4, 5), (5, 6)]):
            found[name].append(times[b] - times[a])
    batch = [b[1] - a[1] for a, b in zip(marks, marks[1:]) if a[0] == "on_step" and b[0] == "step"]
    step = [b[1] - a[1] for a, b in zip(marks, marks[1:]) if a[0] == "step" and b[0] == "stepped"]
    return ({name: statistics.median(v) for name, v in found.items()}, statistics.median(batch),
            statistics.median(step))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    args = p.parse_args()
    if args.steps < 50 * (SKIP + 2):
        print(f"error: --steps must be at least {50 * (SKIP + 2)}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)
    rows = {"background": stretches(True, args.steps), "in the step": stretches(False, args.steps)}
    print(f"tiny MLP, a checkpoint every 50 steps, {args.steps} steps (medians, µs):")
    print(f"{'':14}" + "".join(f"{name:>14}" for name in STRETCHES) + f"{'extra':>10}")
    for label, (found, batch, step) in rows.items():
        ordinary = {"save": 0.0, "first batch": batch, "first step": step, "second batch": batch,
                    "second step": step}
        extra = sum(found[name] - ordinary[name] for name in STRETCHES)
        print(f"{label:14}" + "".join(f"{found[name] * 1e6:14.0f}" for name in STRETCHES) + f"{extra * 1e6:10.0f}")
        print(f"{'  ordinary':14}" + "".join(f"{ordinary[name] * 1e6:14.0f}" for name in STRETCHES))


if __name__ == "__main__":
    main()
