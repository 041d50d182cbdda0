"""The checks a machine with a GPU should run once: the CUDA paths CI (CPU only) never takes.

    python experiments/device_check.py --device cuda     # fp16 + GradScaler, CUDA RNG, nccl under torchrun
    python experiments/device_check.py --device cpu      # the same checks with bf16 and gloo (CI runs this)

1. Twins under mixed precision train like native: the same config, all native and all custom,
   final losses within the precision's tolerance (fp16 with a GradScaler on CUDA, bf16 on CPU).
2. A run interrupted mid-epoch and resumed ends with the same weights, bit for bit, as one never
   interrupted: with dropout on the device, so the device's RNG state must come back.
3. DDP: `torchrun --nproc_per_node=N -m trainer run` (nccl on CUDA, gloo on CPU) with twins
   finishes and writes exactly one run directory.

Prints one line per check and exits 1 if any fails.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from trainer import Trainer, load_config
from trainer.loop import Interrupted

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["model={name: mlp, in_features: 10, out_features: 1, hidden: [64, 64], dropout: 0.2, activation: gelu}",
         "optimizer={name: adam, lr: 0.003}", "data.batch_size=64", "train.max_epochs=3", "log.progress=false"]


class StopAt(Trainer):
    """Interrupted after step ``at`` as Ctrl-C would: the loop saves and raises ``Interrupted``."""

    at = 0

    def on_step(self) -> None:
        if self.step == self.at:
            self._signal = signal.SIGINT
        super().on_step()


def config(logdir: Path, device: str, *extra: str):
    return load_config(ROOT / "configs" / "quickstart.yaml", [f"log.dir={logdir}", f"train.device={device}",
                                                             *MODEL, *extra])


def check_precision(logdir: Path, device: str) -> tuple[bool, str]:
    precision, tol = ("16", 5e-3) if device == "cuda" else ("bf16", 2e-2)
    losses = {}
    for impl in ("native", "custom"):
        result = Trainer(config(logdir, device, f"train.precision={precision}", f"layers.default={impl}")).fit()
        losses[impl] = result.metrics["train/loss"]
    ok = abs(losses["custom"] - losses["native"]) <= tol * max(1.0, abs(losses["native"]))
    return ok, f"precision {precision}: final loss native {losses['native']:.6g}, custom {losses['custom']:.6g}"


def check_resume(logdir: Path, device: str) -> tuple[bool, str]:
    whole = Trainer(config(logdir, device, "layers.default=custom"))
    whole.fit()
    first = StopAt(config(logdir, device, "layers.default=custom"))
    first.at = whole.step // 2 + 3  # mid-epoch
    try:
        first.fit()
        return False, "resume: the interrupted run was not interrupted"
    except Interrupted:
        pass
    resumed = Trainer(config(logdir, device, "layers.default=custom"), resume=first.run_dir)
    resumed.fit()
    same = all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), whole.model.parameters()))
    return same, f"resume at step {first.at} of {whole.step} with dropout on {device}: weights bit-identical {same}"


def check_ddp(logdir: Path, device: str, procs: int) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "-m", "trainer", "run",
           str(ROOT / "configs" / "quickstart.yaml"), f"log.dir={logdir}", f"train.device={device}",
           "layers.default=custom", "name=ddp", *MODEL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    runs = list((logdir / "ddp").glob("version_*"))
    ok = proc.returncode == 0 and len(runs) == 1
    tail = proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
    return ok, f"torchrun x{procs} ({'nccl' if device == 'cuda' else 'gloo'}): exit {proc.returncode}, " \
               f"{len(runs)} run dir(s) {' '.join(tail)}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--procs", type=int, default=None, help="torchrun processes (default: GPUs, or 2 on CPU)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here (try --device cpu)", file=sys.stderr)
        return 2
    if args.procs is not None and args.procs < 1:
        print(f"error: --procs must be at least 1, got {args.procs}", file=sys.stderr)
        return 2
    procs = args.procs or (torch.cuda.device_count() if args.device == "cuda" else 2)
    logdir = Path(tempfile.mkdtemp(prefix="device_check_"))
    try:
        results = [check_precision(logdir, args.device), check_resume(logdir, args.device),
                   check_ddp(logdir, args.device, procs)]
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    for ok, line in results:
        print(("ok   " if ok else "FAIL ") + line)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
