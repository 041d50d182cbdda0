"""Per-step cost of `trainer` against a bare hand-written loop doing the same work, measured side by side.

Both loops train the same MLP on the same data with the same optimizer, show a tqdm bar
and write TensorBoard scalars every 50 steps. Runs alternate (bare, trainer, bare, ...)
so machine noise hits both alike; the figure is the median ratio of their per-step times.
A per-step time is the steady state: from the end of step WARM to the end of the last
step, so one-off setup and teardown (building, the final checkpoint) are left out.

    python experiments/bench_overhead.py                 # tiny and medium MLP, and shadow mode's cost
    python experiments/bench_overhead.py --steps 3000 --repeats 7 --model tiny
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from trainer import Trainer, datasets, load_config

# name: (widths, data section, loss)
WARM = 100
MODELS = {
    "tiny": ([32, 64, 64, 1], "{name: regression, in_features: 32, n_samples: N, val_fraction: 0.0}", "mse"),
    "medium": ([256, 512, 512, 10], "{name: classification, n_features: 256, n_classes: 10, n_samples: N, "
                                    "val_fraction: 0.0}", "cross_entropy"),
}


def config(model: str, steps: int, logdir: str, extra: list[str]):
    widths, data, loss = MODELS[model]
    return load_config({
        "name": "bench",
        "model": {"name": "mlp", "in_features": widths[0], "hidden": widths[1:-1], "out_features": widths[-1]},
        "loss": {"name": loss},
        "optimizer": {"name": "sgd", "lr": 0.001},
        "data": {**yaml.safe_load(data.replace("N", str(64 * steps + 64))), "batch_size": 64},
        "train": {"max_steps": steps, "max_epochs": None},
        "log": {"every": 50, "progress": True, "dir": logdir},
    }, extra)


def bare_loop(cfg) -> float:
    """The loop a user would write by hand; returns seconds per step."""
    torch.manual_seed(cfg.seed)
    dims = [cfg.model.kwargs["in_features"], *cfg.model.kwargs["hidden"]]
    mods = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    model = nn.Sequential(*mods, nn.Linear(dims[-1], cfg.model.kwargs["out_features"]))
    train = datasets.get(cfg.data.name)(**cfg.data.kwargs)["train"]
    loader = DataLoader(train, batch_size=cfg.data.batch_size, shuffle=True)
    loss_fn = nn.MSELoss() if cfg.loss.name == "mse" else nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    device = torch.device("cpu")
    steps = cfg.train.max_steps
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir)
        bar = tqdm(total=steps, file=sys.stdout, mininterval=0.5)
        step = 0
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
            if step == WARM:
                start = time.perf_counter()
            if step == steps:
                break
        elapsed = time.perf_counter() - start
        bar.close()
        writer.close()
    return elapsed / (steps - WARM)


class TimedTrainer(Trainer):
    """The Trainer with a clock read after step WARM and after the last step (nothing else changes)."""

    def on_step(self) -> None:
        super().on_step()
        if self.step == WARM:
            self.start = time.perf_counter()
        elif self.step == self.cfg.train.max_steps:
            self.stop = time.perf_counter()


def trainer_loop(cfg) -> float:
    trainer = TimedTrainer(cfg)
    trainer.fit()
    return (trainer.stop - trainer.start) / (trainer.step - WARM)


def measure(first, second, repeats: int) -> tuple[float, float, float]:
    """Median (first s/step, second s/step, second/first) over alternating runs; bars go to a null stream."""
    a, b, ratios = [], [], []
    for i in range(repeats + 1):
        with contextlib.redirect_stdout(io.StringIO()):
            x, y = first(), second()
        if i == 0:
            continue  # warm-up
        a.append(x), b.append(y), ratios.append(y / x)
    return statistics.median(a), statistics.median(b), statistics.median(ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", choices=[*MODELS, "both"], default="both")
    args = p.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread each keeps the comparison stable
    print(f"{'comparison':44} {'ms/step':>8} {'ms/step':>8} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as logdir:
        for name in MODELS if args.model == "both" else [args.model]:
            cfg = config(name, args.steps, logdir, [])
            b, t, r = measure(lambda: bare_loop(cfg), lambda: trainer_loop(cfg), args.repeats)
            print(f"{name + ' MLP: bare loop -> trainer':44} {b * 1e3:8.3f} {t * 1e3:8.3f} {r:7.3f}x", flush=True)
        twins = config("tiny", args.steps, logdir, ["layers.default=custom"])
        shadow = config("tiny", args.steps, logdir, ["layers.default=custom", "compare.every=50"])
        a, b, r = measure(lambda: trainer_loop(twins), lambda: trainer_loop(shadow), args.repeats)
        print(f"{'tiny MLP, twins: trainer -> + shadow every 50':44} {a * 1e3:8.3f} {b * 1e3:8.3f} {r:7.3f}x")


if __name__ == "__main__":
    main()
