"""The checks a machine with a GPU should run once: the CUDA paths CI (CPU only) never takes.

    python experiments/device_check.py --device cuda     # fp16 + GradScaler, CUDA RNG, nccl under torchrun
    python experiments/device_check.py --device cpu      # the same checks with bf16 and gloo (CI runs this)

1. Twins under mixed precision train like native: the same config, all native and all custom,
   final losses within the precision's tolerance (fp16 with a GradScaler on CUDA, bf16 on CPU).
2. A run interrupted mid-epoch and resumed ends with the same weights, bit for bit, as one never
   interrupted: with dropout on the device, so the device's RNG state must come back.
3. DDP: `torchrun --nproc_per_node=N -m trainer run` (nccl on CUDA, gloo on CPU) with twins
   finishes and writes exactly one run directory. On one GPU that is a single process, so a
   further check wraps a twin model in DistributedDataParallel over a one-rank nccl group
   (NCCL refuses two ranks on one GPU) and compares its gradients with the bare model's.
4. Every twin on the device: gradcheck/gradgradcheck in float64, parity with native in float32
   (TF32 off), and under autocast (fp16 on CUDA, bf16 on CPU) the same output and grad dtypes
   as native and values within that precision's tolerance.
5. `trainer compare` on the device, dropout in the model: one batch, and 20 steps in lockstep,
   find native and custom in agreement (both draw the same dropout masks from one seed).
6. Syncs: 200-step runs with twins (an MLP; the digits CNN, with cross_entropy, where
   scikit-learn is installed) and sync debug mode on count the host-device
   synchronizations by where they happen and which steps they fall in; fewer than half the steps
   may see one (they belong to the logging cadence, every 50 steps, and to each epoch's
   validation and checkpoint), so a sync in every step fails.

Prints one line per check and exits 1 if any fails.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from trainer import Trainer, layers, load_config
from trainer.check.audit import as_function, close_to_either, native_per_element, prepare, tolerance
from trainer.check.probe import gradcheck_layers
from trainer.loop import Interrupted

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["model={name: mlp, in_features: 10, out_features: 1, hidden: [64, 64], dropout: 0.2, activation: gelu}",
         "optimizer={name: adam, lr: 0.003}", "data.batch_size=64", "train.max_epochs=3", "log.progress=false"]


class StopAt(Trainer):
    """Interrupted after step ``at`` as Ctrl-C would: the loop saves and raises ``Interrupted``."""

    at = 0

    def on_step(self) -> None:
        if self.step == self.at:
            self.stops.first = signal.SIGINT
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


def check_ddp_one_rank(device: str) -> tuple[bool, str]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device == "cuda" else "gloo"
    with socket.socket() as s:  # a free port for the group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        bare = layers.swap(nn.Sequential(nn.Linear(10, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64),
                                         nn.SiLU(), nn.Linear(64, 1)), {"default": "custom"}).to(device)
        ddp = DistributedDataParallel(copy.deepcopy(bare), device_ids=[0] if device == "cuda" else None)
        x, y = torch.randn(64, 10, device=device), torch.randn(64, 1, device=device)
        for model in (bare, ddp):
            nn.functional.mse_loss(model(x), y).backward()
        worst = max((p.grad - q.grad).abs().max().item() for p, q in zip(bare.parameters(), ddp.parameters()))
    finally:
        dist.destroy_process_group()
    return worst <= 1e-6, f"DDP over a one-rank {backend} group, twins in: grads differ from the bare model by {worst:.2g}"


def forward_backward(spec, case, impl, device, low):
    """[output, *grads] of one impl in float32 (under autocast to ``low`` unless None), and the grad_output."""
    module, inputs = prepare(spec, case, torch.float32, impl, device=device)
    fn, args = as_function(module, inputs, seed=1)
    with torch.autocast(device, dtype=low or torch.float32, enabled=low is not None):
        out = fn(*args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device, out.dtype)
    need = [a for a in args if a.requires_grad]
    grads = torch.autograd.grad(out, need, g, allow_unused=True) if need and out.requires_grad else ()
    return [out, *grads], g


def parity(spec, case, device, low) -> str | None:
    """None if the twin matches native on this case (dtypes, and values within tolerance), else what differs.

    An edge case (``case.edges``) may match native's answer for each element computed alone instead.
    """
    (native, g), (custom, _) = (forward_backward(spec, case, impl, device, low) for impl in ("native", "custom"))
    alone = native_per_element(spec, case, g, torch.float32, device, low) if case.edges else (None, None)
    tol = tolerance(spec, low or torch.float32)
    for i, (n, c) in enumerate(zip(native, custom)):
        what = "output" if i == 0 else f"grad {i - 1}"
        if (n is None) != (c is None) or n is not None and n.dtype != c.dtype:
            return f"{what}: dtype {getattr(c, 'dtype', None)} vs native {getattr(n, 'dtype', None)}"
        if n is None:
            continue
        other = alone[i] if i < len(alone) and alone[i] is not None else n
        if not bool(close_to_either(c.float(), n.float(), other.float(), tol).all()):
            return f"{what}: max |custom - native| {(c.float() - n.float()).abs().max().item():.3g}"
    return None if len(native) == len(custom) else f"{len(custom)} grads vs native {len(native)}"


def check_twins(device: str) -> tuple[bool, str]:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    low = torch.float16 if device == "cuda" else torch.bfloat16
    results = gradcheck_layers(device=device)
    problems = [f"{r.layer}:{r.case} {r.check}: {r.message}" for r in results if not r.ok]
    cases = [(spec, case) for spec in layers.specs() for case in spec.cases()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # what some cases provoke on purpose (dim=None, ...)
        for spec, case in cases:
            for mode in (None, low):
                problem = parity(spec, case, device, mode)
                if problem:
                    problems.append(f"{spec.name}:{case.id} {'float32' if mode is None else mode}: {problem}")
    for line in problems:
        print("  " + line)
    return not problems, (f"twins on {device}: {len(results)} gradchecks, {len(cases)} cases x (float32, {low}) "
                          f"parity; {len(problems)} problem(s)")


def check_compare(logdir: Path, device: str) -> tuple[bool, str]:
    from trainer.check.compare import compare_config
    from trainer.check.lockstep import run_lockstep

    report, _ = compare_config(config(logdir, device))
    steps_ok = run_lockstep(config(logdir, device), 20).ok
    return report.ok and steps_ok, f"compare on {device} with dropout: one batch ok {report.ok}, 20 lockstep steps ok {steps_ok}"


def check_syncs(logdir: Path, device: str) -> tuple[bool, str]:
    if device != "cuda":
        return True, "syncs: only counted on CUDA"
    runs = {"mlp": config(logdir, device)}
    try:
        import sklearn  # noqa: F401  (the digits data ship with scikit-learn)
        runs["digits cnn"] = load_config(ROOT / "configs" / "digits.yaml", [f"log.dir={logdir}", "log.progress=false"])
    except ImportError:
        pass
    seen: Counter[str] = Counter()
    synced: dict[str, set[int]] = {}
    for name, cfg in runs.items():
        cfg = load_config(cfg.to_dict(), ["layers.default=custom", "train.max_steps=200", "train.max_epochs=null",
                                          "log.every=50", f"train.device={device}"])
        marks: list[tuple[int, int]] = []

        class Marking(Trainer):
            def on_step(self) -> None:  # how many warnings had come by the end of each step's work
                marks.append((self.step, len(caught)))
                super().on_step()

        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                Marking(cfg).fit()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [i for i, w in enumerate(caught) if "synchroniz" in str(w.message)]
        seen.update(f"{name} {Path(caught[i].filename).name}:{caught[i].lineno}" for i in syncs)
        before = [0] + [n for _, n in marks]  # a step's own work, its on_step and the next step's work
        synced[name] = {step for (step, n), start in zip(marks, before) if any(start <= i < n for i in syncs)}
    # syncs belong to the log cadence, validation and checkpoints (each epoch here), never every step
    ok = all(len(steps) < 100 for steps in synced.values())
    counts = ", ".join(f"{name} {len(steps)} of 200 steps" for name, steps in synced.items())
    return ok, f"syncs with twins ({counts} synced; log every 50): {sum(seen.values())}, at {dict(seen.most_common(8))}"


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
        results = []
        for check in (lambda: check_precision(logdir, args.device), lambda: check_resume(logdir, args.device),
                      lambda: check_ddp(logdir, args.device, procs), lambda: check_ddp_one_rank(args.device),
                      lambda: check_twins(args.device), lambda: check_compare(logdir, args.device),
                      lambda: check_syncs(logdir, args.device)):
            try:  # one check's crash must not hide the others' results
                results.append(check())
            except Exception as e:  # noqa: BLE001
                results.append((False, f"crashed: {type(e).__name__}: {e}"))
            print(("ok   " if results[-1][0] else "FAIL ") + results[-1][1], flush=True)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
