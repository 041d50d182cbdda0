"""Per-step cost of `trainer` against a bare hand-written loop doing the same work, measured side by side.

Both loops train the same MLP on the same data with the same optimizer, show a tqdm bar
and write TensorBoard scalars every 50 steps. They run at the same time in two threads
that take turns of TURN steps (a baton passed at the end of every 50th step, so each
turn holds one logging step), and each sums the time of its own turns: on a shared,
noisy machine a slow spell then falls on both alike, which whole runs one after the
other cannot promise (those differed by 1.5x here). Steps up to WARM (one-off setup,
first allocations) and the last turn (teardown) are left out; the figure is the median
over repeats of the ratio of the summed times. Each turn is also timed in CPU seconds of
the whole process (``time.process_time``: the loop's thread, the thread that serializes
checkpoints, TensorBoard's writer thread; not the checkpoint writer process, whose work
runs beside the loop), which time spent waiting for a busy machine's cores does not
inflate: the second ratio, the steadier one when the machine is shared.

The rows show each cost on its own. The data is the user's own plain ``TensorDataset``
(per-sample ``__getitem__`` and default collate) on both sides, given to the trainer
through the config (a dataset registered here), unless the row says "gathered": then
both sides get the built-in datasets' whole gathered batches (``trainer.datasets.Tensors``).
"50-batch epochs" means the trainer checkpoints every 50 steps (at each epoch end). The
trainer's turns end half a turn after its checkpoints: its background writer overlaps the
trainer's own next 25 steps, as in a real run, and the trainer waits for the writer before
passing the baton, so no write runs in the other loop's turn (and the CPU-time ratio counts
the training process's part of each write whole). "Long epochs": one epoch for the whole run, no checkpoint until the end.

    python experiments/bench_overhead.py                 # tiny and medium MLP, and shadow mode's cost
    python experiments/bench_overhead.py --steps 3000 --repeats 7 --model tiny
    python experiments/bench_overhead.py --model tiny --rows gathered noise --repeats 15
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import threading
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from trainer import Trainer, data, datasets, load_config

WARM = 100
TURN = 50
SHORT = 50  # batches in a short epoch
ROWS = ["short", "long", "gathered", "shadow", "noise"]
# name: (widths, dataset kind, loss)
MODELS = {
    "tiny": ([32, 64, 64, 1], "regression", "mse"),
    "medium": ([256, 512, 512, 10], "classification", "cross_entropy"),
}


@datasets.register("bench_plain")
def plain(kind: str = "regression", n_samples: int = 1024, features: int = 32, classes: int = 10,
          gathered: bool = False) -> dict[str, Dataset]:
    """A built-in dataset's training data as a user's own ``TensorDataset`` (or, ``gathered``, as the built-in's)."""
    if kind == "regression":
        train = datasets.get("regression")(n_samples=n_samples, in_features=features, val_fraction=0.0)["train"]
    else:
        train = datasets.get("classification")(n_samples=n_samples, n_features=features, n_classes=classes,
                                               val_fraction=0.0)["train"]
    return {"train": train if gathered else TensorDataset(*train.tensors)}


def config(model: str, steps: int, logdir: str, extra: list[str], *, epoch: int | None = None, gathered=False):
    """``epoch``: batches per epoch (a checkpoint at each end); None: one epoch for the whole run."""
    widths, kind, loss = MODELS[model]
    n = 64 * (epoch or steps + 1)
    return load_config({
        "name": "bench",
        "model": {"name": "mlp", "in_features": widths[0], "hidden": widths[1:-1], "out_features": widths[-1]},
        "loss": {"name": loss},
        "optimizer": {"name": "sgd", "lr": 0.001},
        "data": {"name": "bench_plain", "kind": kind, "n_samples": n, "features": widths[0], "classes": widths[-1],
                 "gathered": gathered, "batch_size": 64},
        "train": {"max_steps": steps, "max_epochs": None},
        "log": {"every": 50, "progress": True, "dir": logdir},
    }, extra)


class Baton:
    """Two loops take turns of TURN steps; each side sums the time of its own turns after step WARM."""

    def __init__(self):
        self.turn = [threading.Semaphore(1), threading.Semaphore(0)]
        self.done = [False, False]
        self.busy = [0.0, 0.0]
        self.cpu = [0.0, 0.0]
        self.steps = [0, 0]  # the steps each side's summed turns hold
        self.began = [(0.0, 0.0), (0.0, 0.0)]

    def start(self, side: int) -> None:
        self.turn[side].acquire()
        self.began[side] = time.perf_counter(), time.process_time()

    def step_done(self, side: int, step: int, offset: int = 0) -> None:
        """End of ``step`` (every step but the last): at the end of a turn, pass the baton and wait for it.

        A side's turns end at the steps ``offset`` past a multiple of TURN.
        """
        if (step - offset) % TURN:
            return
        if step - TURN >= WARM:  # the turn began after the warm-up
            self.busy[side] += time.perf_counter() - self.began[side][0]
            self.cpu[side] += time.process_time() - self.began[side][1]
            self.steps[side] += TURN
        if not self.done[1 - side]:
            self.turn[1 - side].release()
            self.turn[side].acquire()
        self.began[side] = time.perf_counter(), time.process_time()

    def finish(self, side: int) -> None:
        self.done[side] = True
        self.turn[1 - side].release()


def bare_loop(cfg, baton: Baton, side: int) -> None:
    """The loop a user would write by hand, over a plain DataLoader of the same dataset."""
    torch.manual_seed(cfg.seed)
    dims = [cfg.model.kwargs["in_features"], *cfg.model.kwargs["hidden"]]
    mods = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    model = nn.Sequential(*mods, nn.Linear(dims[-1], cfg.model.kwargs["out_features"]))
    train = datasets.get(cfg.data.name)(**cfg.data.kwargs)["train"]
    # the gathered dataset's batches come whole and pass the collate as they are, as in the trainer
    collate = data.collate if cfg.data.kwargs.get("gathered") else None
    loader = DataLoader(train, batch_size=cfg.data.batch_size, shuffle=True, collate_fn=collate)
    loss_fn = nn.MSELoss() if cfg.loss.name == "mse" else nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    device = torch.device("cpu")
    steps = cfg.train.max_steps
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir)
        bar = tqdm(total=steps, file=sys.stdout, mininterval=0.5, disable=cfg.log.progress is False)
        step = 0
        baton.start(side)
        while step < steps:
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                step += 1
                bar.update()
                if step % 50 == 0:
                    writer.add_scalar("train/loss", loss.item(), step)
                if step == steps:
                    break
                baton.step_done(side, step)
        bar.close()
        writer.close()


class TimedTrainer(Trainer):
    """The Trainer passing the baton after each step (nothing else changes).

    Its turns end half a turn after its checkpoints (taken at multiples of TURN), so a background
    write overlaps the trainer's own next steps, as in a real run; at the end of the turn it waits
    for the writer, so no write runs in the other loop's turn.
    """

    def on_step(self) -> None:
        super().on_step()
        if self.step < self.cfg.train.max_steps:
            if (self.step - TURN // 2) % TURN == 0:
                self.checkpoints.wait()  # a write still in flight is the trainer's cost, not the other side's
            self.baton.step_done(self.side, self.step, offset=TURN // 2)


def trainer_loop(cfg, baton: Baton, side: int) -> None:
    trainer = TimedTrainer(cfg)
    trainer.baton, trainer.side = baton, side
    baton.start(side)
    trainer.fit()  # the final checkpoint and hparams land in the last turn: one-off, like setup


def measure(first, second, repeats: int) -> tuple[float, float, float, float]:
    """(first s/step, second s/step, second/first, the same in CPU time), medians over repeats of turns.

    The loops swap places (which starts, which thread) from one repeat to the next, so a bias of
    either place falls on both alike. Progress bars go to a null stream.
    """
    a, b, ratios, cpu_ratios = [], [], [], []
    for i in range(repeats + 1):
        baton, errors = Baton(), []
        order = (first, second) if i % 2 else (second, first)

        def run(f, side):
            try:
                f(baton, side)
            except BaseException as e:  # re-raised below, once the other side has finished
                errors.append(e)
            finally:
                baton.finish(side)  # the other side no longer waits for this one

        with contextlib.redirect_stdout(io.StringIO()):
            threads = [threading.Thread(target=run, args=(f, side)) for side, f in enumerate(order)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        if i == 0:
            continue  # warm-up
        x, y = (busy / counted for busy, counted in zip(baton.busy, baton.steps))
        (cpu_x, cpu_y), (x, y) = (baton.cpu, (x, y)) if i % 2 else (baton.cpu[::-1], (y, x))
        a.append(x), b.append(y), ratios.append(y / x), cpu_ratios.append(cpu_y / cpu_x)
    return statistics.median(a), statistics.median(b), statistics.median(ratios), statistics.median(cpu_ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model", choices=[*MODELS, "both"], default="both")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS[:-1],
                   help="which rows (default: all but noise, two copies of the bare loop against each other)")
    args = p.parse_args()
    if args.steps <= WARM + 2 * TURN or args.repeats < 1:
        print(f"error: --steps must be above {WARM + 2 * TURN} (steps up to {WARM} are warm-up) and --repeats "
              f"at least 1 (got {args.steps}, {args.repeats})", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)  # a shared 2-core machine: one thread each keeps the comparison stable
    print(f"{'comparison':52} {'ms/step':>8} {'ms/step':>8} {'ratio':>7} {'CPU ratio':>9}")

    def row(label: str, first, second, cfg1, cfg2) -> None:
        a, b, r, c = measure(lambda baton, side: first(cfg1, baton, side),
                             lambda baton, side: second(cfg2, baton, side), args.repeats)
        print(f"{label:52} {a * 1e3:8.3f} {b * 1e3:8.3f} {r:7.3f}x {c:8.3f}x", flush=True)

    with tempfile.TemporaryDirectory() as logdir:
        for name in MODELS if args.model == "both" else [args.model]:
            short = config(name, args.steps, logdir, [], epoch=SHORT)
            long = config(name, args.steps, logdir, [])
            gathered = config(name, args.steps, logdir, [], gathered=True)
            if "short" in args.rows:
                row(f"{name} MLP, {SHORT}-batch epochs: bare loop -> trainer", bare_loop, trainer_loop, short, short)
            if "long" in args.rows:
                row(f"{name} MLP, long epochs: bare loop -> trainer", bare_loop, trainer_loop, long, long)
            if "gathered" in args.rows:
                row(f"{name} MLP, long epochs, gathered: bare -> trainer", bare_loop, trainer_loop, gathered, gathered)
            if "noise" in args.rows:
                row(f"{name} MLP, gathered: bare loop -> bare loop", bare_loop, bare_loop, gathered, gathered)
        if "shadow" in args.rows:
            twins = config("tiny", args.steps, logdir, ["layers.default=custom"], gathered=True)
            shadow = config("tiny", args.steps, logdir, ["layers.default=custom", "compare.every=50"], gathered=True)
            row("tiny MLP, twins: trainer -> + shadow every 50", trainer_loop, trainer_loop, twins, shadow)


if __name__ == "__main__":
    main()
