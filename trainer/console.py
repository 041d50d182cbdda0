"""What a run prints on stdout (rank 0 only): the start line, plain progress lines, the summary.

On a terminal the tqdm bar (``trainer.logs``) shows progress; off one (a pipe, a log file,
a cluster job) a plain line every ``log.every`` steps does, so a log always says how far a
run got. The formats are documented in docs/cli.md.
"""
from __future__ import annotations

import shlex
import sys
from os import PathLike


def resume_command(run_dir: str | PathLike) -> str:
    """The command that continues ``run_dir`` from its last checkpoint, ready to copy."""
    return f"trainer run --resume {shlex.quote(str(run_dir))}"


def say(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


def start_line(run_dir: str | PathLike, label: str = "") -> str:
    """``run: DIR  optimizer.lr=0.1  (watch: tensorboard --logdir DIR)``."""
    shown = f"  {label}" if label else ""
    return f"run: {run_dir}{shown}  (watch: tensorboard --logdir {shlex.quote(str(run_dir))})"


def progress_line(step: int, total: int | None, epoch: int, epochs: int | None, loss: float, lr: float,
                  speed: float) -> str:
    """``step 40/300  epoch 2/10  loss=0.4123  lr=0.01  samples/s=5120``; epochs count from 1."""
    of_steps = f"/{total}" if total else ""
    of_epochs = f"/{epochs}" if epochs else ""
    return f"step {step}{of_steps}  epoch {epoch + 1}{of_epochs}  loss={loss:.4g}  lr={lr:.3g}  samples/s={speed:.0f}"


def leftovers_note(names: list[str]) -> str:
    """``; removed 2 temporary files a killed process left (never read)``, or nothing."""
    if not names:
        return ""
    return f"; removed {plural(len(names), 'temporary file')} a killed process left (never read)"


def metrics_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))


def summary(result, label: str = "") -> str:
    """The lines a finished run ends with (``result`` is a ``FitResult``)."""
    shown = f"  {label}" if label else ""
    lines = [f"done: {result.run_dir}{shown}",
             f"  stopped: {result.reason} at step {result.step}, {plural(result.epoch, 'full epoch')}, "
             f"after {duration(result.seconds)}",
             f"  final: {metrics_text(result.metrics) or '-'}"]
    if result.best is not None:
        best = f"{result.monitor}={result.best:.6g}"
        lines.append(f"  best: {best}  checkpoint {result.best_path}" if result.best_path else f"  best: {best}")
    return "\n".join(lines)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def duration(seconds: float) -> str:
    """``42.1s``, ``3m 05s``, ``2h 01m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    return f"{m}m {s:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"
