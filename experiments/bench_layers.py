"""Each twin against its native layer: forward+backward time and saved bytes inside a model, as ratios.

Native and custom calls alternate (native, custom, native, ...) on the same input, one thread,
each timed on its own, so machine noise hits both alike; a ratio is the median over rounds of
custom/native time.
Saved bytes are the distinct storages autograd keeps for pre -> layer -> post, where post keeps
the layer's output anyway, as the next Linear would (trainer.check.audit.saved_bytes).

    python experiments/bench_layers.py                      # every layer at 1e4, 1e5, 1e6 elements
    python experiments/bench_layers.py --sizes 1e7 --layers relu gelu
    python experiments/bench_layers.py --device cuda        # on a GPU, each call ends in a synchronize
    python experiments/bench_layers.py --aa                 # native against itself: the noise floor
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
from trainer.check.audit import saved_bytes


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


def seconds(native: nn.Module, custom: nn.Module, inputs, budget: float) -> tuple[float, float]:
    """Mean seconds of one forward+backward of each module, calls alternating (native, custom, ...).

    Each call is timed on its own and summed per side, so a slow spell of the machine falls on
    both alike; the calls go on until each side has run for about ``budget`` seconds.
    """
    device = inputs[0].device
    totals, calls = [0.0, 0.0], 0
    for module in (native, custom):  # warm-up
        step(module, inputs)
    while min(totals) < budget or calls < 3:
        for i, module in enumerate((native, custom)):
            sync(device)
            start = time.perf_counter()
            step(module, inputs)
            sync(device)  # a GPU runs behind the Python that queues its work
            totals[i] += time.perf_counter() - start
        calls += 1
    return totals[0] / calls, totals[1] / calls


def bench(name: str, n: int, rounds: int, budget: float, device: str = "cpu", aa: bool = False) -> dict:
    torch.manual_seed(0)
    native, inputs = SETUPS[name](n)
    native = native.to(device)
    inputs = tuple(t.detach().to(device).requires_grad_(t.requires_grad) for t in inputs)
    custom = copy.deepcopy(native) if aa else layers.swap(copy.deepcopy(native), {name: "custom"})
    assert layers.impl_of(custom) == (name, "native" if aa else "custom"), name
    times = [seconds(native, custom, inputs, budget) for _ in range(rounds)]
    ratios = [c / nat for nat, c in times]
    return {"layer": name, "n": sum(t.numel() for t in inputs[:1]),
            "native_us": statistics.median(nat for nat, _ in times) * 1e6,
            "time_ratio": statistics.median(ratios),
            "bytes_ratio": saved_bytes(custom, inputs) / max(1, saved_bytes(native, inputs))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6])
    p.add_argument("--layers", nargs="+", default=list(SETUPS), choices=list(SETUPS), metavar="LAYER")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--budget", type=float, default=0.05, help="seconds per timing")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--aa", action="store_true", help="native against a copy of itself: the method's noise floor")
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
    what = "native / a copy of native" if args.aa else "custom / native"
    print(f"{'layer':16}{head}   ({what}; bytes = saved inside a model)")
    for name in args.layers:
        cells = [bench(name, n, args.rounds, args.budget, args.device, args.aa) for n in sizes]
        print(f"{name:16}" + "".join(f"{c['time_ratio']:11.2f}x{c['bytes_ratio']:6.2f}x" for c in cells), flush=True)


if __name__ == "__main__":
    main()
