"""Instructions per training step, the trainer against the bare loop, counted by valgrind: the loop's own cost without timing noise.

``bench_overhead.py`` times the two loops side by side; on a shared machine its ratios carry a
few percent of noise, as much as the loop's own work on a tiny model. Instructions executed do
not vary from run to run: each loop runs twice in its own process under valgrind's cachegrind
(no cache simulation), once for SHORT steps and once for LONG, on the same data, and the
difference divided by LONG - SHORT is the count per step, setup and teardown cancelled out. The
loops are ``bench_overhead``'s (a TensorBoard scalar every 50 steps on both sides, one torch
thread, one epoch for the whole run) without their tqdm bars: a bar redraws on a clock, and
under valgrind, some 50 times slower, it would redraw far more often per step than in a real
run. An instruction is not a nanosecond (a cache miss or a wait for the GIL costs time and no
instructions), so this complements the timings, it does not replace them. Needs ``valgrind``
on the PATH; the four runs take about ten minutes.

    python experiments/count_overhead.py
    python experiments/count_overhead.py --data plain --steps 300 1300
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = """
import contextlib, io, sys, tempfile
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
import bench_overhead as B

class NoBaton:  # one loop alone: nothing to hand over
    def start(self, side): pass
    def step_done(self, side, step, offset=0): pass
    def finish(self, side): pass

with tempfile.TemporaryDirectory() as logdir:
    cfg = B.config({model!r}, {steps}, logdir, ["log.progress=false"], epoch={epoch}, gathered={gathered})
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        B.{loop}(cfg, NoBaton(), 0)
"""


def instructions(loop: str, steps: int, epoch: int, args: argparse.Namespace) -> int:
    code = CHILD.format(here=str(HERE), model=args.model, steps=steps, epoch=epoch, gathered=args.data == "gathered",
                        loop=loop)
    proc = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                           sys.executable, "-c", code], capture_output=True, text=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if proc.returncode != 0 or not found:
        sys.exit(f"error: the {loop} run under valgrind failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs=2, default=[500, 1500], metavar=("SHORT", "LONG"))
    p.add_argument("--model", choices=["tiny", "medium"], default="tiny")
    p.add_argument("--data", choices=["gathered", "plain"], default="gathered",
                   help="the built-in datasets' gathered batches, or a plain TensorDataset (per-sample __getitem__)")
    args = p.parse_args()
    short, long = args.steps
    if not 0 < short < long:
        print(f"error: --steps SHORT LONG must be 0 < SHORT < LONG (got {short} {long})", file=sys.stderr)
        sys.exit(2)
    if shutil.which("valgrind") is None:
        print("error: valgrind is not on the PATH (apt install valgrind)", file=sys.stderr)
        sys.exit(2)
    epoch = long + 1  # one epoch longer than the run: the same data for both lengths, no epoch-end checkpoint
    per_step = {}
    for loop in ("bare_loop", "trainer_loop"):
        counts = [instructions(loop, n, epoch, args) for n in (short, long)]
        per_step[loop] = (counts[1] - counts[0]) / (long - short)
    bare, trainer = per_step["bare_loop"], per_step["trainer_loop"]
    print(f"{args.model} MLP, {args.data} batches, instructions per step (steps {short} to {long}):")
    print(f"  bare loop {bare / 1e6:.3f} M   trainer {trainer / 1e6:.3f} M   ratio {trainer / bare:.3f}x")


if __name__ == "__main__":
    main()
