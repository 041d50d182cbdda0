"""Each twin against its native layer: forward+backward time and saved bytes inside a model, as ratios.

Native and custom run interleaved (native, custom, native, ...) on the same input, one thread,
so machine noise hits both alike; a ratio is the median over rounds of custom/native time.
Saved bytes are the distinct storages autograd keeps for pre -> layer -> post, where post keeps
the layer's output anyway, as the next Linear would (trainer.audit.saved_bytes).

    python experiments/bench_layers.py                      # every layer at 1e4, 1e5, 1e6 elements
    python experiments/bench_layers.py --sizes 1e7 --layers relu gelu
    python experiments/bench_layers.py --device cuda        # on a GPU, each timing ends in a synchronize
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch import nn

from trainer import layers
from trainer.audit import saved_bytes


def rows(n: int, width: int) -> int:
    return max(1, n // width)


def g(*shape, low=None, high=None):
    """A float32 input of ``shape`` (uniform in [low, high) if given, else standard normal)."""
    if low is not None:
        return (torch.rand(*shape) * (high - low) + low).requires_grad_()
    return torch.randn(*shape).requires_grad_()


# name -> (module, inputs of about n elements)
SETUPS = {
    "relu": lambda n: (nn.ReLU(), (g(n),)),
    "leaky_relu": lambda n: (nn.LeakyReLU(0.1), (g(n),)),
    "elu": lambda n: (nn.ELU(), (g(n),)),
    "gelu": lambda n: (nn.GELU(), (g(n),)),
    "silu": lambda n: (nn.SiLU(), (g(n),)),
    "mish": lambda n: (nn.Mish(), (g(n),)),
    "softplus": lambda n: (nn.Softplus(), (g(n),)),
    "sigmoid": lambda n: (nn.Sigmoid(), (g(n),)),
    "tanh": lambda n: (nn.Tanh(), (g(n),)),
    "hardsigmoid": lambda n: (nn.Hardsigmoid(), (g(n, low=-5, high=5),)),
    "hardswish": lambda n: (nn.Hardswish(), (g(n, low=-5, high=5),)),
    "softmax": lambda n: (nn.Softmax(dim=-1), (g(rows(n, 1000), 1000),)),
    "log_softmax": lambda n: (nn.LogSoftmax(dim=-1), (g(rows(n, 1000), 1000),)),
    "linear": lambda n: (nn.Linear(512, 512), (g(rows(n, 512), 512),)),
    "conv2d": lambda n: (nn.Conv2d(16, 16, 3, padding=1), (g(rows(n, 16 * 32 * 32), 16, 32, 32),)),
    "layer_norm": lambda n: (nn.LayerNorm(512), (g(rows(n, 512), 512),)),
    "batch_norm": lambda n: (nn.BatchNorm1d(256), (g(rows(n, 256), 256),)),
    "dropout": lambda n: (nn.Dropout(0.1), (g(n),)),
    "embedding": lambda n: (nn.Embedding(10000, 128), (torch.randint(0, 10000, (rows(n, 128),)),)),
    "mse": lambda n: (nn.MSELoss(), (g(n), torch.randn(n))),
    "l1": lambda n: (nn.L1Loss(), (g(n), torch.randn(n))),
    "huber": lambda n: (nn.HuberLoss(), (g(n), torch.randn(n))),
    "cross_entropy": lambda n: (nn.CrossEntropyLoss(), (g(rows(n, 1000), 1000),
                                                       torch.randint(0, 1000, (rows(n, 1000),)))),
    "bce_with_logits": lambda n: (nn.BCEWithLogitsLoss(), (g(n), torch.rand(n))),
}


def step(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    out = module(*inputs)
    out.backward(torch.ones_like(out))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(module: nn.Module, inputs, budget: float) -> float:
    """Mean seconds of one forward+backward, over as many calls as fit in ``budget``."""
    device = inputs[0].device
    step(module, inputs)
    sync(device)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget or calls < 3:
        step(module, inputs)
        calls += 1
        if calls % 8 == 0:  # a GPU runs behind the Python that queues its work
            sync(device)
    sync(device)
    return (time.perf_counter() - start) / calls


def bench(name: str, n: int, rounds: int, budget: float, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    native, inputs = SETUPS[name](n)
    native = native.to(device)
    inputs = tuple(t.detach().to(device).requires_grad_(t.requires_grad) for t in inputs)
    custom = layers.swap(copy.deepcopy(native), {name: "custom"})
    assert layers.impl_of(custom) == (name, "custom"), name
    times = {"native": [], "custom": []}
    for _ in range(rounds):
        for impl, module in (("native", native), ("custom", custom)):
            torch.manual_seed(1)
            times[impl].append(seconds(module, inputs, budget))
    ratios = [c / nat for c, nat in zip(times["custom"], times["native"])]
    return {"layer": name, "n": sum(t.numel() for t in inputs[:1]),
            "native_us": statistics.median(times["native"]) * 1e6,
            "time_ratio": statistics.median(ratios),
            "bytes_ratio": saved_bytes(custom, inputs) / max(1, saved_bytes(native, inputs))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6])
    p.add_argument("--layers", nargs="+", default=list(SETUPS), choices=list(SETUPS), metavar="LAYER")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--budget", type=float, default=0.05, help="seconds per timing")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here (leave --device out for the CPU)", file=sys.stderr)
        sys.exit(2)
    if min(args.sizes) < 1 or args.rounds < 1 or not args.budget > 0:
        print("error: --sizes must be at least 1, --rounds at least 1 and --budget above 0 "
              f"(got {args.sizes}, {args.rounds}, {args.budget})", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes]
    head = "".join(f"{f'{s:.0e} time':>12}{'bytes':>7}" for s in sizes)
    print(f"{'layer':16}{head}   (custom / native; bytes = saved inside a model)")
    for name in args.layers:
        cells = [bench(name, n, args.rounds, args.budget, args.device) for n in sizes]
        print(f"{name:16}" + "".join(f"{c['time_ratio']:11.2f}x{c['bytes_ratio']:6.2f}x" for c in cells), flush=True)


if __name__ == "__main__":
    main()
