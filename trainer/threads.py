"""The process's first parallel regions, run on throwaway data before anything a run computes.

In a fresh process the first OpenMP parallel region, when it is an MKL vector-math call
(``torch.cos`` on more than 2,048 float32 values, the grain ATen's VML ops split at), was seen
to return slightly different values in some processes on some CPUs; later calls are exact. A
dataset built with that call then differs from run to run. ``warm_up`` makes those first
regions ours, on zeros whose results are dropped, so a run's numbers depend on its config
and seed only, whatever its dataset or model computes first.
"""
from __future__ import annotations

import torch

_done = False


def warm_up() -> None:
    """Run a plain parallel loop, an MKL vector-math call and an MKL matmul over every thread, once per process."""
    global _done
    if _done:
        return
    _done = True
    threads = max(1, torch.get_num_threads())
    torch.zeros(2 * 32768 * threads).add_(1.0)  # ATen's parallel_for grain: every thread gets a chunk
    torch.cos(torch.zeros(2 * 2048 * threads))  # VML's grain: every thread makes its first MKL call
    # and MKL's BLAS: the regression dataset's first parallel work is its x @ w (an unexplained kill -9 resume
    # difference on that data, once in 20 fresh processes, fits the same first-call cause)
    torch.ones(256, 256) @ torch.ones(256, 256)
