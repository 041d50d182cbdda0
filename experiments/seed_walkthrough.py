"""The seed article's three steps, written with trainer's public API, printing what happens at each one.

1. The plain loop: zero_grad / forward / loss / backward / step, here run by Trainer on the seed task.
2. ctx.save_for_backward / ctx.saved_tensors: what a custom Function keeps for its backward, seen live.
3. A CustomReLU swapped into a model from the config, trained beside native ReLU: same gradients, same weights.

    python experiments/seed_walkthrough.py
"""
from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import torch
from torch import nn

from trainer import Trainer, layers, load_config

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}")


def step1_plain_loop(logdir: str) -> None:
    banner("Step 1 - the plain loop: Linear(10, 1), MSE, SGD(lr=0.01) on the seed's regression task")
    print("Trainer.train_step, the whole update (gradient accumulation and AMP are no-ops here):\n")
    print(inspect.getsource(Trainer.train_step))
    cfg = load_config(QUICKSTART, [f"log.dir={logdir}", "log.progress=false", "train.max_epochs=20"])
    trainer = Trainer(cfg)
    before = trainer.evaluate()["val/loss"]
    result = trainer.fit()
    print(f"val/loss before training: {before:.4f}; after {result.step} steps: {result.metrics['val/loss']:.4f}")
    print(f"learned weight[:3] = {trainer.model.weight[0, :3].tolist()}")
    print(f"run directory: {result.run_dir}  (watch: tensorboard --logdir {result.run_dir})")


def step2_saved_tensors() -> None:
    banner("Step 2 - ctx.save_for_backward: what a custom Function keeps for backward")
    relu = layers.get("relu").custom()
    print(f"{type(relu).__name__} runs {relu.function.__name__}; its setup_context:\n")
    print(inspect.getsource(relu.function.setup_context))
    x = torch.tensor([-2.0, -0.0, 0.0, 1.5, 3.0], requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = relu(x)
    print(f"x = {x.tolist()}\ny = {y.tolist()}")
    print(f"saved for backward: {len(saved)} tensor(s); the output itself: {saved[0].data_ptr() == y.data_ptr()}")
    print(f"y.grad_fn = {type(y.grad_fn).__name__}  (the custom backward is in the graph)")
    y.backward(torch.ones_like(y))
    print(f"dy/dx = {x.grad.tolist()}  (0 at x == 0, like native: threshold_backward(g, y, 0))")


def step3_custom_relu() -> None:
    banner("Step 3 - CustomReLU swapped in by `layers: {relu: custom}`, trained beside native ReLU")
    x, y = torch.randn(256, 10, generator=torch.Generator().manual_seed(0)), None
    y = x.sum(1, keepdim=True).relu()
    models = {}
    for impl in layers.IMPLS:
        torch.manual_seed(0)
        model = layers.swap(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1)), {"relu": impl})
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(100):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        models[impl] = model
        print(f"{impl:6}: {model[1]!r:14} final loss {loss.item():.6f}")
    diff = max((p - q).abs().max().item() for p, q in zip(models["custom"].parameters(),
                                                          models["native"].parameters()))
    print(f"largest weight difference after 100 steps: {diff:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", default="runs", help="where step 1's run goes (default: runs, beside the other runs)")
    step1_plain_loop(p.parse_args().logdir)
    step2_saved_tensors()
    step3_custom_relu()


if __name__ == "__main__":
    main()
