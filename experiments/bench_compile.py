"""A torch.compile'd model and loss with every twin swapped in against the same model compiled native, per training step.

All models are compiled once (warm-up not timed), then timed interleaved, one thread: forward,
loss, backward and an SGD step on the same batch. Reports each one's compile time too. With
``--each``, also one model per layer with only that layer's twin in, to find which one costs.

    python experiments/bench_compile.py
    python experiments/bench_compile.py --device cuda --batch 4096 --each   # timings end in a synchronize
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from trainer import layers

LAYERS = ["linear", "layer_norm", "gelu", "silu", "dropout", "cross_entropy"]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.LayerNorm(512), nn.GELU(), nn.Linear(512, 512), nn.SiLU(),
                         nn.Dropout(0.1), nn.Linear(512, 10))


def step_fn(mapping: dict[str, str], device: str):
    """A training step of the model and loss swapped by ``mapping``, both compiled (as ``train.compile`` does)."""
    net = layers.swap(model().to(device), mapping)
    loss_fn = torch.compile(layers.swap(nn.CrossEntropyLoss(), mapping))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    compiled = torch.compile(net)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss_fn(compiled(x), y).backward()
        opt.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--each", action="store_true", help="also each layer's twin alone")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "error: --device cuda: no CUDA device here (leave --device out for the CPU)\n")
    torch.set_num_threads(1)
    x, y = torch.randn(args.batch, 256, device=args.device), torch.randint(0, 10, (args.batch,), device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    mappings = {"native": {"default": "native"}, "custom": {"default": "custom"}}
    if args.each:
        mappings.update({f"{name} only": {"default": "native", name: "custom"} for name in LAYERS})
    steps, compile_s = {}, {}
    for name, mapping in mappings.items():
        steps[name] = step_fn(mapping, args.device)
        start = time.perf_counter()
        steps[name](x, y)
        steps[name](x, y)
        sync()
        compile_s[name] = time.perf_counter() - start
    times = {name: [] for name in mappings}
    for _ in range(args.rounds):
        for name in times:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name](x, y)
            sync()
            times[name].append((time.perf_counter() - start) / args.steps)
    print(f"compiled MLP 256-512-512-10 (layer_norm, gelu, silu, dropout, cross_entropy), batch {args.batch}, "
          f"{args.device}")
    for name in times:
        ratio = statistics.median(t / n for t, n in zip(times[name], times["native"]))
        print(f"{name:20} {statistics.median(times[name]) * 1e3:8.3f} ms/step  {ratio:6.3f}x   "
              f"first two steps (compile) {compile_s[name]:6.1f} s")
    ratio = statistics.median(c / n for c, n in zip(times["custom"], times["native"]))
    print(f"custom / native: {ratio:.3f}x")


if __name__ == "__main__":
    main()
